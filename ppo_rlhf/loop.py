"""Host-side pieces of the PPO loop shared by both trainers (numpy / stdlib only).

Everything random here is a pure function of (seed, iteration), so that a resumed run sees
exactly the prompts and minibatch orders an uninterrupted run would have seen, and so that the
JAX and PyTorch trainers -- fed the same config -- process the same minibatches in the same order
(the full-step parity test depends on it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ppo_rlhf.errors import UsageError


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent numpy stream for (seed, *stream) (SeedSequence spawning, no collisions)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


# Stream ids, so that prompts, minibatches and sampling never share random numbers.
STREAM_PROMPTS, STREAM_MINIBATCHES, STREAM_SAMPLING = 1, 2, 3


class PromptStream:
    """An endless, seeded, epoch-wise shuffled stream of prompts; `batch(i)` is the i-th batch.

    Iteration i takes positions [i * B, (i + 1) * B) of the concatenation of shuffled epochs, so the
    prompts of any iteration are known without replaying the ones before (exact resume)."""

    def __init__(self, prompts: Sequence[str], batch_size: int, seed: int = 0, shuffle: bool = True):
        self.prompts = list(prompts)
        if not self.prompts:
            raise UsageError("the prompt dataset is empty")
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.prompts)
        return _rng(self.seed, STREAM_PROMPTS, epoch).permutation(n) if self.shuffle else np.arange(n)

    def indices(self, iteration: int) -> list[int]:
        n, out = len(self.prompts), []
        for pos in range(iteration * self.batch_size, (iteration + 1) * self.batch_size):
            epoch, k = divmod(pos, n)
            out.append(int(self._epoch_order(epoch)[k]))
        return out

    def batch(self, iteration: int) -> list[str]:
        return [self.prompts[i] for i in self.indices(iteration)]


def minibatch_indices(seed: int, iteration: int, *, batch_size: int, ppo_epochs: int,
                      num_minibatches: int) -> np.ndarray:
    """int32 [ppo_epochs * num_minibatches, minibatch_size]: the rows of each optimiser step, a
    fresh permutation of the batch per epoch (as TRL), a pure function of (seed, iteration)."""
    rng = _rng(seed, STREAM_MINIBATCHES, iteration)
    mb = batch_size // num_minibatches
    perms = [rng.permutation(batch_size) for _ in range(ppo_epochs)]
    return np.stack(perms).reshape(ppo_epochs * num_minibatches, mb).astype(np.int32)


def sampling_seed(seed: int, iteration: int) -> int:
    """A 32-bit seed for iteration `iteration`'s sampling (never the same key twice)."""
    return int(_rng(seed, STREAM_SAMPLING, iteration).integers(0, 2**31 - 1))


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int, *,
                     warn: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded int32 ids and mask [B, max_len] of `prompts`. A prompt longer than max_len is
    truncated FROM THE LEFT (its end, next to the response, is kept) with a warning; returns the
    number truncated too. Special tokens are not added (the tokenizer's BOS, if the model wants
    one, belongs in the prompt text or the tokenizer's post-processor)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UsageError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    ids = np.full((len(prompts), max_len), pad, dtype=np.int32)
    mask = np.zeros((len(prompts), max_len), dtype=np.int32)
    truncated = 0
    for i, p in enumerate(prompts):
        toks = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not toks:
            raise UsageError(f"prompt {i} tokenizes to nothing: {p!r}")
        if len(toks) > max_len:
            truncated += 1
            toks = toks[-max_len:]
        ids[i, max_len - len(toks):] = toks
        mask[i, max_len - len(toks):] = 1
    if truncated and warn:
        warnings.warn(f"{truncated} of {len(prompts)} prompts are longer than max_prompt_len="
                      f"{max_len} tokens and were truncated from the left", stacklevel=2)
    return ids, mask, truncated


def decode_responses(tokenizer: Any, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    """Text of each response's real tokens (special tokens such as EOS skipped)."""
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(np.asarray(response_ids), np.asarray(response_mask))]


def contains_eos(response_ids: np.ndarray, response_mask: np.ndarray, eos_token_id: int | None) -> np.ndarray:
    """bool [B]: does the response end with EOS (inside its real tokens)."""
    if eos_token_id is None:
        return np.zeros(len(response_ids), dtype=bool)
    return ((np.asarray(response_ids) == eos_token_id) & (np.asarray(response_mask) != 0)).any(axis=1)


class NonFiniteUpdates(RuntimeError):
    """Too many consecutive PPO updates had a non-finite loss or gradient."""


class BadUpdateCounter:
    """Counts consecutive skipped (non-finite) optimiser steps across iterations."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = int(limit), 0, 0

    def record(self, skipped: Sequence[bool], iteration: int) -> None:
        for s in skipped:
            if s:
                self.consecutive += 1
                self.total += 1
                if self.consecutive >= self.limit:
                    raise NonFiniteUpdates(
                        f"iteration {iteration}: {self.consecutive} consecutive PPO updates had a "
                        f"non-finite loss or gradient (NaN/inf); stopping. Skipped updates change "
                        f"nothing, so the newest checkpoint is intact: fix the cause (e.g. a "
                        f"lower learning_rate, the reward's scale) and continue with --resume")
            else:
                self.consecutive = 0


# ---- metrics ---------------------------------------------------------------------------------
def to_float(x: Any) -> float:
    return float(np.asarray(x))


class MetricsWriter:
    """Appends one JSON object per line, flushed and fsynced (a crash loses nothing written)."""

    def __init__(self, path: str | os.PathLike, *, truncate_after: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            # on resume, drop records of iterations after the checkpoint (they will be redone)
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and _complete_json(l) and json.loads(l).get("iteration", -1) <= truncate_after]
            self.path.write_text("".join(k + "\n" for k in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _complete_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip() and _complete_json(l)]


@contextmanager
def phase_timer(times: dict[str, float], name: str, block: Any = None) -> Iterator[None]:
    """Accumulate wall time of a block into times[name]; `block()` is called at the end so that
    asynchronous work (JAX dispatch, CUDA kernels) is counted in its own phase."""
    t0 = time.perf_counter()
    yield
    if block is not None:
        block()
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


class StopRequested:
    """SIGTERM / SIGINT set a flag instead of killing the process, so the trainer can finish its
    iteration, write a checkpoint and exit cleanly. A second signal exits at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def mean_of(values: Sequence[Any]) -> float:
    vals = [to_float(v) for v in values]
    return float(np.mean(vals)) if vals else math.nan
