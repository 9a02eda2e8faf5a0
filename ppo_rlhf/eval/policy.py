"""Evaluation of a policy (step 6 of the seed), backend-neutral glue.

`ppo_jax.evaluate.sample_and_score` / `ppo_torch.evaluate.sample_and_score` (mirrors) do the
array work -- sample responses from the policy and from the reference, their log-probs under
both, reward-model scores -- and return numpy arrays; this module turns them into the numbers
people look at:

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
