"""How good a scorer is on preference data: pairwise accuracy over ranked groups and rated
responses, and the normalisation that gives a reward model's scores mean 0 and std 1.

Held-out accuracy: over the strictly ordered pairs of the held-out groups, the fraction the model
orders correctly; equal scores count one half; ties are excluded (`group_accuracy`). On records of
the synthetic labeller, the reward-model trainer also reports the labeller's noise ceiling and the
model's expected accuracy (`ppo_rlhf.feedback.labeller`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np


def group_accuracy(scores: np.ndarray, tiers: np.ndarray,
                   weight: np.ndarray | None = None) -> tuple[float, int]:
    """(accuracy, pairs) over every strictly ordered pair (tier_i < tier_j, both >= 0) of every
    group: 1 if s_i > s_j, 1/2 if equal, 0 otherwise. Ties (equal tiers) are excluded. Rows of
    weight 0 are left out. Accuracy is NaN when there is no pair."""
    s = np.asarray(scores, np.float64)
    t = np.asarray(tiers)
    valid = t >= 0
    if weight is not None:
        valid = valid & (np.asarray(weight) > 0)[:, None]
    ordered = valid[:, :, None] & valid[:, None, :] & (t[:, :, None] < t[:, None, :])
    d = s[:, :, None] - s[:, None, :]
    correct = np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))
    n = int(ordered.sum())
    return (float((correct * ordered).sum() / n) if n else math.nan), n


def pairwise_accuracy(chosen: Any, rejected: Any) -> float:
    """Fraction of pairs with score(chosen) > score(rejected); equal scores count one half."""
    c, r = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if c.size == 0:
        return math.nan
    return float(np.mean(np.where(c > r, 1.0, np.where(c == r, 0.5, 0.0))))


def rating_pair_accuracy(prompts: Sequence[str], ratings: Any, scores: Any) -> tuple[float, int]:
    """Accuracy over pairs of rated responses to the same prompt with different ratings."""
    r, s = np.asarray(ratings, np.float64), np.asarray(scores, np.float64)
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    hi, lo = [], []
    for rows in by_prompt.values():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                if r[i] != r[j]:
                    hi.append(i if r[i] > r[j] else j)
                    lo.append(j if r[i] > r[j] else i)
    return pairwise_accuracy(s[hi], s[lo]), len(hi)


def normalisation(scores: Any) -> tuple[float, float]:
    """(gain, bias) making gain * scores + bias have mean 0 and (population) std 1. Constant
    scores get gain 1 and only the mean removed (with a warning)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("normalisation needs at least one score")
    mean, std = float(s.mean()), float(s.std())
    if not std > 1e-12:
        warnings.warn("every reference score is the same; reward_gain left at 1", stacklevel=2)
        return 1.0, -mean
    return 1.0 / std, -mean / std


__all__ = ["group_accuracy", "pairwise_accuracy", "rating_pair_accuracy", "normalisation"]
