"""The PyTorch array work of evaluation (`ppo_rlhf.eval.policy.ScoringKit`): log-prob sums and
reward-model scores of sampled chunks, without autograd. The sampling, loading and bookkeeping are
`ppo_rlhf.eval.policy.sample_and_score`, written once for both cores. Mirror: `ppo_jax/evaluate.py`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ppo_rlhf.eval import policy
from ppo_torch import models
from ppo_torch.models import response_logprobs, sequence_scores
from ppo_torch.sample_text import sample_texts

_ROWS = ("query_ids", "query_mask", "response_ids", "response_mask")


def _tensors(chunk: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(chunk[k]).long() for k in _ROWS]


@torch.no_grad()
def _logprob_sums(model: Any, chunk: dict[str, np.ndarray], temperature: float) -> np.ndarray:
    return response_logprobs(model, *_tensors(chunk), temperature=temperature).sum(1).numpy()


@torch.no_grad()
def _sequence_scores(model: Any, chunk: dict[str, np.ndarray]) -> np.ndarray:
    return sequence_scores(model, *_tensors(chunk)).numpy()


KIT = policy.ScoringKit.of(models, sample_texts, logprob_sums=_logprob_sums, sequence_scores=_sequence_scores)
sample_and_score = functools.partial(policy.sample_and_score, KIT)

__all__ = ["KIT", "sample_and_score"]
