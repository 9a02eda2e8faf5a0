"""The JAX array work of evaluation (`ppo_rlhf.eval.policy.ScoringKit`): jitted log-prob sums
and reward-model scores of sampled chunks. The sampling, loading and bookkeeping are
`ppo_rlhf.eval.policy.sample_and_score`, written once for both cores. Mirror: `ppo_torch/evaluate.py`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from ppo_jax import models
from ppo_jax.models import response_logprobs, sequence_scores
from ppo_jax.sample_text import sample_texts
from ppo_rlhf.eval import policy

_ROWS = ("query_ids", "query_mask", "response_ids", "response_mask")
_score = jax.jit(sequence_scores)
_logprobs = jax.jit(response_logprobs, static_argnames=("temperature",))


def _logprob_sums(model: Any, chunk: dict[str, np.ndarray], temperature: float) -> np.ndarray:
    return np.asarray(_logprobs(model, *(chunk[k] for k in _ROWS), temperature=temperature)).sum(1)


def _sequence_scores(model: Any, chunk: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(_score(model, *(chunk[k] for k in _ROWS)))


KIT = policy.ScoringKit.of(models, sample_texts, logprob_sums=_logprob_sums, sequence_scores=_sequence_scores)
sample_and_score = functools.partial(policy.sample_and_score, KIT)

__all__ = ["KIT", "sample_and_score"]
