"""Every random choice of the host loops, as a pure function of (seed, position).

Prompt order, PPO minibatch order, sampling seeds, the reward model's batch order and hold-out
split, the SFT example order: each is computed from the config's seed and the iteration / step
it is for, never from a generator that advances. So a resumed run sees exactly the data an
uninterrupted run would have seen (the position is all the "data state" a checkpoint needs), and
the JAX and PyTorch trainers -- fed the same config -- process the same rows in the same order
(the full-step parity tests depend on it).

Each use draws from its own stream (`STREAM_*`) of numpy's SeedSequence, so no two uses ever
share random numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ppo_rlhf.errors import UsageError

STREAM_PROMPTS, STREAM_MINIBATCHES, STREAM_SAMPLING = 1, 2, 3
STREAM_RM_ORDER, STREAM_HOLDOUT, STREAM_SFT_ORDER = 11, 12, 13
STREAM_LORA_DROPOUT = 21


def rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent numpy stream for (seed, *stream) (SeedSequence spawning, no collisions)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


# ---- PPO ---------------------------------------------------------------------------------------
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
        return rng(self.seed, STREAM_PROMPTS, epoch).permutation(n) if self.shuffle else np.arange(n)

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
    gen = rng(seed, STREAM_MINIBATCHES, iteration)
    mb = batch_size // num_minibatches
    perms = [gen.permutation(batch_size) for _ in range(ppo_epochs)]
    return np.stack(perms).reshape(ppo_epochs * num_minibatches, mb).astype(np.int32)


def sampling_seed(seed: int, *position: int) -> int:
    """A 31-bit seed for the sampling at `position` (a PPO iteration; a stream and a batch of
    `sample_texts`): never the same key twice."""
    return int(rng(seed, STREAM_SAMPLING, *position).integers(0, 2**31 - 1))


# ---- reward model and SFT ------------------------------------------------------------------------
def dropout_seed(seed: int, *position: int) -> int:
    """The seed of the LoRA adapters' dropout masks of one training step at `position` (PPO:
    iteration; RM / SFT: step), a pure function of them: a run and its resume draw the same
    masks. JAX folds the minibatch and micro-batch into a key made from it inside the update
    program; torch seeds its generator with `dropout_seed(seed, *position, step, micro, rank)`."""
    return int(rng(seed, STREAM_LORA_DROPOUT, *position).integers(0, 2**31 - 1))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n records in epoch `epoch`: a seeded permutation, a pure function of
    (seed, epoch)."""
    return rng(seed, STREAM_RM_ORDER, epoch).permutation(n)


def rm_batch_rows(seed: int, step: int, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows [batch_size], weight [batch_size], epoch) of reward-model step `step`: batch
    step % steps_per_epoch of `epoch_order(seed, epoch)`; a short last batch is completed with
    the batch's first rows again, at weight 0."""
    per_epoch = -(-n // batch_size)
    epoch, b = divmod(int(step), per_epoch)
    rows = epoch_order(seed, epoch, n)[b * batch_size:(b + 1) * batch_size]
    weight = np.ones(batch_size, np.float32)
    if len(rows) < batch_size:
        weight[len(rows):] = 0.0
        rows = np.resize(rows, batch_size)  # repeats the rows cyclically
    return rows, weight, epoch


def sft_batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Rows of SFT step `step`: positions [step * B, (step + 1) * B) of the concatenation of
    seeded per-epoch permutations of n examples (every batch is full; a pure function of
    (seed, step), so a resume needs only the step)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(int(rng(seed, STREAM_SFT_ORDER, epoch).permutation(n)[k]))
    return np.asarray(out, np.int64)


__all__ = ["rng", "PromptStream", "minibatch_indices", "sampling_seed", "dropout_seed", "epoch_order",
           "rm_batch_rows", "sft_batch_indices"]
