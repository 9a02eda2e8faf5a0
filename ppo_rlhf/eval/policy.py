"""Evaluation of a policy (step 6 of the six steps, docs/formulas.md), backend-neutral.

`sample_and_score(kit, ...)` samples responses from the policy and from the reference, takes
their log-probs under both and the reward model's scores, with the array work done by a core's
`ScoringKit` (`ppo_jax.evaluate.KIT`, `ppo_torch.evaluate.KIT`); this module turns the numpy
results into the numbers people look at:

  rm_score        mean reward-model score of the policy's responses
  gold_score      mean gold (task) reward of the same responses, when the task has one
  kl_to_ref       mean over prompts of sum_t (log pi - log pi_ref)(response token t): a Monte-Carlo
                  estimate of KL(pi || pi_ref) per response (k1; unbiased)
  win_rate        fraction of prompts whose policy response the reward model scores above the
                  reference's response to the same prompt (ties count half)
  samples         prompt / response / scores records (JSONL)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ppo_rlhf.rewards import ScoreRequest, as_reward_model, check_scores
from ppo_rlhf.sampling import TextSamples
from ppo_rlhf.tokens import load_tokenizer


@dataclass
class SampledScores:
    """What a backend's `sample_and_score` returns (numpy / lists)."""

    prompts: list[str]
    responses: list[str]
    logprobs_sum: np.ndarray          # [N] sum of policy log-probs of each policy response
    ref_logprobs_sum: np.ndarray      # [N] the same responses under the reference
    response_len: np.ndarray          # [N] real tokens (incl. EOS)
    contains_eos: np.ndarray          # [N] bool
    rm_scores: np.ndarray | None = None          # [N] reward model on policy responses
    ref_responses: list[str] | None = None       # reference's own responses
    ref_rm_scores: np.ndarray | None = None      # [N] reward model on the reference's responses


@dataclass(frozen=True)
class ScoringKit:
    """The array work `sample_and_score` asks of a core, on numpy chunks of `TextSamples.chunks`
    (query_ids, query_mask, response_ids, response_mask):

    load_pretrained(path, dtype), load_scalar_model(path, dtype), sample_texts(...)   as the core's
    is_scalar_model(obj) -> bool        a reward model of this core (else a reward function / object)
    logprob_sums(model, chunk, temperature) -> [B] float    sum of response log-probs per row
    sequence_scores(model, chunk) -> [B] float              the scalar model's score per row
    """

    load_pretrained: Callable[..., Any]
    load_scalar_model: Callable[..., Any]
    sample_texts: Callable[..., Any]
    is_scalar_model: Callable[[Any], bool]
    logprob_sums: Callable[[Any, dict, float], Any]
    sequence_scores: Callable[[Any, dict], Any]

    @classmethod
    def of(cls, models: Any, sample_texts: Callable[..., Any], *, logprob_sums: Callable[[Any, dict, float], Any],
           sequence_scores: Callable[[Any, dict], Any]) -> ScoringKit:
        """A core's kit from its `models` package (loaders, `ScalarHeadModel`) and its functions."""
        return cls(models.load_pretrained, models.load_scalar_model, sample_texts,
                   lambda obj: isinstance(obj, models.ScalarHeadModel), logprob_sums, sequence_scores)


def _scores(kit: ScoringKit, rm: Any, s: TextSamples, batch_size: int) -> np.ndarray:
    """The reward model's (or reward function's) score of every sample."""
    if not kit.is_scalar_model(rm):
        req = ScoreRequest(s.query_ids, s.query_mask, s.response_ids, s.response_mask,
                           prompts=s.prompts, responses=s.texts)
        return check_scores(as_reward_model(rm).score(req), len(s.texts), source="reward")
    return np.concatenate([np.asarray(kit.sequence_scores(rm, c))[:n] for n, c in s.chunks(batch_size)])


def _logprob_sums(kit: ScoringKit, model: Any, s: TextSamples, batch_size: int,
                  temperature: float) -> np.ndarray:
    return np.concatenate([np.asarray(kit.logprob_sums(model, c, temperature))[:n]
                           for n, c in s.chunks(batch_size)]).astype(np.float64)


def sample_and_score(kit: ScoringKit, policy: str | os.PathLike, prompts: Sequence[str], *,
                     reference: str | os.PathLike | None = None, reward_model: Any = None,
                     max_prompt_len: int = 64, max_new_tokens: int = 32, temperature: float = 0.7,
                     batch_size: int = 16, seed: int = 0, dtype: str = "float32") -> SampledScores:
    """Sample one response per prompt from `policy` (stream 0) and from `reference` (stream 1,
    for the win-rate) with the core's `sample_texts`, log-probs of the policy's samples under both
    models (at `temperature`) and reward-model scores (`reward_model`: a dir, a scalar model of
    the core, or a reward function / object)."""
    tok = load_tokenizer(policy)
    pol = kit.load_pretrained(policy, dtype)
    ref = kit.load_pretrained(reference, dtype) if reference is not None else None
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = kit.load_scalar_model(reward_model, dtype)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              max_prompt_len=max_prompt_len, batch_size=batch_size)
    s = kit.sample_texts(pol, tok, prompts, stream=0, **kw)
    r = kit.sample_texts(ref, tok, prompts, stream=1, **kw) if ref is not None else None
    lp = _logprob_sums(kit, pol, s, batch_size, temperature)
    return SampledScores(
        prompts=list(prompts), responses=s.texts, logprobs_sum=lp,
        ref_logprobs_sum=lp if ref is None else _logprob_sums(kit, ref, s, batch_size, temperature),
        response_len=s.response_mask.sum(1), contains_eos=s.contains_eos,
        rm_scores=None if reward_model is None else _scores(kit, reward_model, s, batch_size),
        ref_responses=None if r is None else r.texts,
        ref_rm_scores=None if r is None or reward_model is None else _scores(kit, reward_model, r, batch_size),
    )


@dataclass
class EvalResult:
    n: int
    rm_score: float | None
    gold_score: float | None
    kl_to_ref: float
    win_rate: float | None
    ref_rm_score: float | None = None
    ref_gold_score: float | None = None
    response_len_mean: float = 0.0
    eos_frac: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(policy_scores: np.ndarray, ref_scores: np.ndarray) -> float:
    """P(policy > reference) over paired prompts, ties counting half."""
    p, r = np.asarray(policy_scores, np.float64), np.asarray(ref_scores, np.float64)
    return float(np.mean((p > r) + 0.5 * (p == r)))


def summarize(s: SampledScores, *, gold: Callable | None = None,
              extra_rewards: Mapping[str, Callable] | None = None) -> tuple[EvalResult, list[dict]]:
    """Numbers and per-sample records from one backend's samples."""
    n = len(s.prompts)
    gold_scores = None if gold is None else np.asarray(gold(s.prompts, s.responses), np.float64)
    ref_gold = (None if gold is None or s.ref_responses is None
                else np.asarray(gold(s.prompts, s.ref_responses), np.float64))
    extra = {name: float(np.mean(fn(s.prompts, s.responses))) for name, fn in (extra_rewards or {}).items()}
    kl = s.logprobs_sum - s.ref_logprobs_sum
    result = EvalResult(
        n=n,
        rm_score=None if s.rm_scores is None else float(np.mean(s.rm_scores)),
        gold_score=None if gold_scores is None else float(gold_scores.mean()),
        kl_to_ref=float(kl.mean()),
        win_rate=(None if s.rm_scores is None or s.ref_rm_scores is None
                  else win_rate(s.rm_scores, s.ref_rm_scores)),
        ref_rm_score=None if s.ref_rm_scores is None else float(np.mean(s.ref_rm_scores)),
        ref_gold_score=None if ref_gold is None else float(ref_gold.mean()),
        response_len_mean=float(np.mean(s.response_len)),
        eos_frac=float(np.mean(s.contains_eos)),
        extra=extra,
    )
    records = []
    for i in range(n):
        rec = {"prompt": s.prompts[i], "response": s.responses[i], "kl": float(kl[i])}
        if s.rm_scores is not None:
            rec["rm_score"] = float(s.rm_scores[i])
        if gold_scores is not None:
            rec["gold_score"] = float(gold_scores[i])
        if s.ref_responses is not None:
            rec["reference_response"] = s.ref_responses[i]
            if s.ref_rm_scores is not None:
                rec["reference_rm_score"] = float(s.ref_rm_scores[i])
        records.append(rec)
    return result, records



def write_samples(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
