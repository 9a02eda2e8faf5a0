"""Reward interfaces shared by both backends.

Two shapes of reward are accepted anywhere a reward is asked for:

* `RewardFn` -- a plain Python function of text:
      def my_reward(prompts: list[str], responses: list[str]) -> list[float]: ...
  (the CLI takes one as `module:function`).

* `RewardModel` -- any object with a `score(request: ScoreRequest) -> array [B]` method. It gets
  both the token ids (left-padded prompts, right-padded responses, masks) and, when a tokenizer
  is known, the decoded text. Learned reward models of either backend satisfy it, so a JAX-trained
  reward model can score a PyTorch rollout and vice versa.

`as_reward_model` turns either into a `RewardModel`; `check_scores` enforces one finite float per
sample (a NaN/inf score is refused with the offending sample named -- training on it would poison
the whole batch through advantage whitening).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class ScoreRequest:
    """A batch of (prompt, response) pairs to score, as token ids and (optionally) text."""

    query_ids: np.ndarray  # int [B, P], left-padded
    query_mask: np.ndarray  # int [B, P]
    response_ids: np.ndarray  # int [B, R], right-padded (up to and including EOS)
    response_mask: np.ndarray  # int [B, R]
    prompts: list[str] | None = None
    responses: list[str] | None = None

    def __len__(self) -> int:
        return int(self.query_ids.shape[0])


@runtime_checkable
class RewardFn(Protocol):
    """A plain function scoring text: (prompts, responses) -> one float per sample."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores a `ScoreRequest` with one float per sample."""

    def score(self, request: ScoreRequest) -> Any: ...


class NonFiniteRewardError(ValueError):
    """A reward returned NaN or inf for some sample."""


def check_scores(scores: Any, n: int, *, source: str = "reward") -> np.ndarray:
    """Validate a reward's output: exactly `n` finite floats. Returns them as float32 numpy."""
    try:
        if hasattr(scores, "detach"):
            scores = scores.detach().float().cpu().numpy()
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{source} must return one number per sample; got {type(scores).__name__}: {e}") from None
    arr = arr.reshape(-1) if arr.ndim > 1 and arr.size == n else arr
    if arr.shape != (n,):
        raise ValueError(f"{source} returned {arr.shape} scores for a batch of {n} samples; "
                         f"expected one float per sample")
    bad = np.where(~np.isfinite(arr))[0]
    if bad.size:
        raise NonFiniteRewardError(
            f"{source} returned non-finite scores ({arr[bad[0]]}) for {bad.size} of {n} samples "
            f"(first: sample {int(bad[0])}); refusing to train on them")
    return arr.astype(np.float32)


class TextRewardModel:
    """Adapts a `RewardFn` (text in, floats out) to the `RewardModel` protocol."""

    def __init__(self, fn: RewardFn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)

    def score(self, request: ScoreRequest) -> np.ndarray:
        if request.prompts is None or request.responses is None:
            raise ValueError(f"reward function {self.name!r} scores text, but no tokenizer was "
                             f"given to decode the rollout")
        return check_scores(self.fn(list(request.prompts), list(request.responses)), len(request),
                            source=f"reward function {self.name!r}")

    def __repr__(self) -> str:
        return f"TextRewardModel({self.name})"


def as_reward_model(obj: Any) -> RewardModel:
    """A `RewardModel` from either protocol (objects with `.score` win over plain callables)."""
    if isinstance(obj, RewardModel):
        return obj
    if callable(obj):
        return TextRewardModel(obj)
    raise TypeError(f"a reward must be a RewardFn (callable(prompts, responses) -> floats) or a "
                    f"RewardModel (with .score(ScoreRequest)); got {type(obj).__name__}")


def load_reward_fn(spec: str) -> RewardFn:
    """Import a reward function given as "package.module:function"."""
    import importlib

    if ":" not in spec:
        raise ValueError(f"reward function {spec!r} must be given as 'module:function'")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} for reward function {spec!r}: {e}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (reward function {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r} is not callable")
    return obj
