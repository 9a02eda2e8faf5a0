"""Sample and score for evaluation (PyTorch). Mirror: `ppo_jax/evaluate.py`; the numbers are
computed in `ppo_rlhf.eval.policy`."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ppo_rlhf.eval.policy import SampledScores
from ppo_rlhf.rewards import ScoreRequest, as_reward_model, check_scores
from ppo_rlhf.tokens import load_tokenizer
from ppo_rlhf.sampling import TextSamples
from ppo_torch.models import (ScalarHeadModel, load_pretrained, load_scalar_model, response_logprobs,
                              sequence_scores)
from ppo_torch.sample_text import sample_texts


def _t(c: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(c[k]).long() for k in ("query_ids", "query_mask", "response_ids", "response_mask")]


@torch.no_grad()
def _scores(rm: Any, s: TextSamples, batch_size: int) -> np.ndarray:
    """The reward model's (or reward function's) score of every sample."""
    if not isinstance(rm, ScalarHeadModel):
        req = ScoreRequest(s.query_ids, s.query_mask, s.response_ids, s.response_mask,
                           prompts=s.prompts, responses=s.texts)
        return check_scores(as_reward_model(rm).score(req), len(s.texts), source="reward")
    return np.concatenate([sequence_scores(rm, *_t(c)).numpy()[:n] for n, c in s.chunks(batch_size)])


@torch.no_grad()
def _logprob_sums(model: Any, s: TextSamples, batch_size: int, temperature: float) -> np.ndarray:
    return np.concatenate([response_logprobs(model, *_t(c), temperature=temperature).sum(1).numpy()[:n]
                           for n, c in s.chunks(batch_size)]).astype(np.float64)


def sample_and_score(policy: str | os.PathLike, prompts: Sequence[str], *,
                     reference: str | os.PathLike | None = None, reward_model: Any = None,
                     max_prompt_len: int = 64, max_new_tokens: int = 32, temperature: float = 0.7,
                     batch_size: int = 16, seed: int = 0, dtype: str = "float32") -> SampledScores:
    """Sample one response per prompt from `policy` (stream 0) and from `reference` (stream 1,
    for the win-rate) with `sample_texts`, log-probs of the policy's samples under both models (at
    `temperature`) and reward-model scores."""
    tok = load_tokenizer(policy)
    pol = load_pretrained(policy, dtype)
    ref = load_pretrained(reference, dtype) if reference is not None else None
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = load_scalar_model(reward_model, dtype)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              max_prompt_len=max_prompt_len, batch_size=batch_size)
    s = sample_texts(pol, tok, prompts, stream=0, **kw)
    r = sample_texts(ref, tok, prompts, stream=1, **kw) if ref is not None else None
    lp = _logprob_sums(pol, s, batch_size, temperature)
    return SampledScores(
        prompts=list(prompts), responses=s.texts, logprobs_sum=lp,
        ref_logprobs_sum=lp if ref is None else _logprob_sums(ref, s, batch_size, temperature),
        response_len=s.response_mask.sum(1), contains_eos=s.contains_eos,
        rm_scores=None if reward_model is None else _scores(reward_model, s, batch_size),
        ref_responses=None if r is None else r.texts,
        ref_rm_scores=None if r is None or reward_model is None else _scores(reward_model, r, batch_size),
    )


__all__ = ["sample_and_score"]
