"""Supervised training, backend-neutral: reward-model training and pretraining / SFT.

The math of one optimiser step lives in the backends (`ppo_jax/reward_model.py`,
`ppo_jax/sft.py` and their `ppo_torch` mirrors); everything else is here, in numpy, shared by
both: configs, tokenisation into fixed-shape batches, the seeded batch order, accuracy and
normalisation math, a fresh GPT-2 initialisation, and the host loop (metrics, progress bar,
atomic checkpoints, final save). Imports neither jax nor torch.

Reward model (`RMConfig`, `encode_preferences`, `RMTrainerBase`)
-----------------------------------------------------------------
Every preference record becomes a GROUP of K scored sequences with TIERS (0 = best):

    pairwise  {chosen, rejected}        -> K = 2, tiers (0, 1); a tie -> (0, 0)
    ranking   {responses, ranking}      -> K responses, tiers from the ranking (tied groups
                                           share a tier)
    rating    {response, rating}        -> K = 1 with a regression target (loss="rating"); for
                                           the other losses ratings are turned into pairs first
                                           (`ppo_rlhf.data.ratings_to_pairs`: same prompt,
                                           different ratings)

A sequence is ids(prompt) + ids(response) + [EOS] (each text tokenised separately with no
special tokens -- how the policy's prompt and sampled response ids sit side by side in PPO --
and EOS appended because PPO scores a finished response at its EOS). It is RIGHT-padded to
`max_length`; a longer one is truncated FROM THE LEFT (the score is read at the last token, so
the end is what must survive; the number truncated is reported). The score of a sequence is
`ScalarHeadModel.score` (the head at the last real token) with gain 1 and bias 0 during training.

Losses (per group; the batch loss is the mean over groups, so a K-wise ranking weighs as much as
a pair, as in InstructGPT), with s the scores and m a margin:

    bradley_terry  mean over the strictly ordered pairs (i better than j) of
                   -log sigma(s_i - s_j - m)                       (Bradley-Terry; margin m from
                   the record's extra[margin_key], Llama-2 style, 0 without margin_key)
    plackett_luce  sum over responses i of -(s_i - logsumexp_{j in R_i} s_j) / |tier(i)|,
                   R_i = {i} and the responses of lower tiers: the negative log-likelihood of the
                   ranking under Plackett-Luce (for K = 2 it is Bradley-Terry)
    best_of_k      the plackett_luce terms of the best tier only: -log softmax(s)[best], the
                   K-way choice of the best response (for K = 2 it is Bradley-Terry)
    rating         (s - z)^2, z = (rating - mean) / std of the TRAINING ratings (MSE)

Ties: `ties="drop"` (default) leaves them out -- a tied pair gives no term, a record with no
ordered pair at all is dropped (counted) -- while `ties="keep"` adds, for each tied pair,
-log sigma(s_i - s_j) / 2 - log sigma(s_j - s_i) / 2 (bradley_terry; minimised at s_i = s_j), and
for plackett_luce / best_of_k puts the other members of i's tier in R_i too (Breslow's rule for
tied ranks, each member weighted 1 / |tier|: for a tied pair it is the same tie loss).

Static shapes: every batch is [batch_size, K_max, max_length] (K_max = the largest group of the
data set); missing slots of smaller groups are copies of slot 0 with tier -1 (never scored into a
loss). The last batch of an epoch is completed with copies of real rows at weight 0 (so every
record is used every epoch and JAX compiles once). The batch order is a seeded permutation per
epoch, a pure function of (seed, epoch) (`epoch_order`), so a resumed run sees the same batches.

Held-out accuracy: over the strictly ordered pairs of the held-out groups, the fraction the model
orders correctly; equal scores count one half; ties are excluded (`group_accuracy`). On records of
the synthetic labeller, the metrics also hold its noise ceiling on the held-out pairs and the
model's expected accuracy there (`ppo_rlhf.labeller.expected_accuracy`: the same accuracy in
expectation over the label noise, a lower-variance estimate). Without an eval set, a seeded `eval_fraction` of the records is held out (`holdout_split`). After training,
with `normalise=True`, reward_gain and reward_bias are set so that the scores of a reference set
(default: every training sequence) have mean 0 and standard deviation 1 (`normalisation`); they
are saved in config.json under "ppo_rlhf" (`ppo_rlhf.hf_checkpoint`).

Pretraining / SFT (`SFTConfig`, `encode_sft`, `SFTTrainerBase`)
------------------------------------------------------------------
An example is plain text (loss on every token after the first) or a (prompt, response) pair
(loss on the response tokens and EOS only, unless `train_on_prompt`); ids = ids(text) + [EOS] or
ids(prompt) + ids(response) + [EOS], RIGHT-padded to `max_length`, truncated at the END. The
loss is the next-token cross-entropy averaged over the target tokens of the batch. Training runs
`num_steps` full batches drawn from seeded per-epoch permutations (`sft_batch_indices`).

Optimiser (both): AdamW through each backend's `ppo.make_optimizer` (optax.adamw(eps_root=0) ==
torch.optim.AdamW) and global-norm clipping with torch's formula (`ppo.clip_by_global_norm`). The
learning rate of each update is `lr_at(applied updates, total steps)` (warm-up, then constant /
linear / cosine decay), computed on the host and passed to the step. A step whose loss or gradient
is not finite is skipped (weights and optimiser state unchanged, the schedule does not advance);
three in a row stop training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ppo_rlhf.errors import UsageError

__all__ = [
    "RMConfig", "SFTConfig", "RM_LOSSES", "TIES", "LR_SCHEDULES",
    "PreferenceGroups", "encode_preferences", "encode_sequences", "encode_sft", "SFTData",
    "epoch_order", "rm_batch_rows", "sft_batch_indices", "holdout_split", "lr_at", "lr_factor",
    "group_accuracy", "pairwise_accuracy", "normalisation", "rating_pair_accuracy",
    "RMTrainerBase", "SFTTrainerBase", "init_gpt2_tensors", "write_fresh_checkpoint",
    "NonFiniteTraining", "reference_sequences", "load_tokenizer_dir",
]

RMLoss = Literal["bradley_terry", "plackett_luce", "best_of_k", "rating"]
RM_LOSSES = ("bradley_terry", "plackett_luce", "best_of_k", "rating")
TIES = ("drop", "keep")
LR_SCHEDULES = ("constant", "linear", "cosine")

# Random streams (ppo_rlhf.loop uses 1-3): never share numbers with the PPO loop's.
STREAM_RM_ORDER, STREAM_HOLDOUT, STREAM_SFT_ORDER = 11, 12, 13


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


# ---- configs -------------------------------------------------------------------------------------
def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: allowed {allowed}")


def _check_number(cls: str, name: str, value: Any, lo: float | None = None, *,
                  lo_open: bool = False, hi: float | None = None, integer: bool = False) -> None:
    kind = "an integer" if integer else "a finite number"
    bound = (f" {'>' if lo_open else '>='} {lo}" if lo is not None else "") + (
        f"{' and' if lo is not None else ''} <= {hi}" if hi is not None else "")
    ok = not isinstance(value, bool) and (isinstance(value, int) if integer else
                                          isinstance(value, (int, float)) and math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        _fail(cls, name, value, kind + bound)


def _check_choice(cls: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(cls, name, value, "one of " + ", ".join(map(repr, choices)))


def _check_bool(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(cls, name, value, "True or False")


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _check_optim(cls: str, c: Any) -> None:
    _check_number(cls, "learning_rate", c.learning_rate, 0.0)
    _check_number(cls, "weight_decay", c.weight_decay, 0.0)
    _check_number(cls, "adam_eps", c.adam_eps, 0.0)
    if c.max_grad_norm is not None:
        _check_number(cls, "max_grad_norm", c.max_grad_norm, 0.0, lo_open=True)
    _check_choice(cls, "lr_schedule", c.lr_schedule, LR_SCHEDULES)
    _check_number(cls, "warmup_steps", c.warmup_steps, 0, integer=True)
    _check_number(cls, "min_lr_ratio", c.min_lr_ratio, 0.0, hi=1.0)
    _check_number(cls, "batch_size", c.batch_size, 1, integer=True)
    _check_number(cls, "max_length", c.max_length, 2, integer=True)
    _check_number(cls, "seed", c.seed, 0, hi=2**32 - 1, integer=True)
    _check_number(cls, "eval_every", c.eval_every, 0, integer=True)
    _check_bool(cls, "append_eos", c.append_eos)


@dataclass(frozen=True)
class RMConfig(_ConfigMixin):
    """Hyperparameters of reward-model training (see the module docstring for the losses)."""

    loss: RMLoss = "bradley_terry"
    """"bradley_terry" (pairs), "plackett_luce" (K-wise rankings), "best_of_k" (softmax choice of
    the best of K) or "rating" (MSE on standardised ratings)."""
    ties: str = "drop"
    """"drop": ties give no loss term (and no accuracy pair); "keep": tied pairs are pulled
    together (-log sigma(d)/2 - log sigma(-d)/2; Breslow's rule in plackett_luce / best_of_k)."""
    margin_key: str | None = None
    """bradley_terry only: read a margin from each record's extra[margin_key] (a number; records
    without it are an error); the loss becomes -log sigma(s_chosen - s_rejected - margin)."""
    learning_rate: float = 3e-4
    """AdamW learning rate (peak, after warm-up). 3e-4 suits the ~1M-parameter demo model (1e-4
    underfits it, 1e-3 is noisier); use ~1e-5 for models of 100M+ parameters."""
    num_epochs: int = 1
    """Passes over the training records (reward models overfit fast: 1-2 is usual)."""
    batch_size: int = 16
    """Records (groups) per optimiser step."""
    max_length: int = 128
    """Tokens per prompt + response sequence (static shape; longer ones lose their start). A
    GPT-2 model (learned positions) refuses more than its n_positions."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to every parameter, as torch.optim.AdamW)."""
    adam_eps: float = 1e-8
    """AdamW epsilon, added to sqrt(v_hat) (outside the root) in both backends."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping (torch's formula in both backends); None = off."""
    lr_schedule: str = "linear"
    """After warm-up: "constant", "linear" (to min_lr_ratio * lr; TRL's default shape) or "cosine"."""
    warmup_steps: int = 0
    """Linear warm-up from lr / warmup_steps to lr over this many steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the linear / cosine decay, as a fraction of learning_rate."""
    seed: int = 0
    """Seeds the batch order, the hold-out split and a fresh score head (scalar_model_from_lm)."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = num_epochs full epochs)."""
    eval_every: int = 0
    """Evaluate on the held-out set every this many steps (0 = at the end of each epoch only)."""
    eval_fraction: float = 0.1
    """Share of the records held out for evaluation when no eval set is given (seeded)."""
    normalise: bool = True
    """After training, set reward_gain / reward_bias so reference scores have mean 0, std 1."""
    append_eos: bool = True
    """Append the tokenizer's EOS to each response (PPO scores responses at their EOS)."""

    def __post_init__(self) -> None:
        c = "RMConfig"
        _check_choice(c, "loss", self.loss, RM_LOSSES)
        _check_choice(c, "ties", self.ties, TIES)
        if self.margin_key is not None:
            if not isinstance(self.margin_key, str) or not self.margin_key:
                _fail(c, "margin_key", self.margin_key, "None or a non-empty string")
            if self.loss != "bradley_terry":
                _fail(c, "margin_key", self.margin_key, "None unless loss='bradley_terry'")
        _check_optim(c, self)
        _check_number(c, "num_epochs", self.num_epochs, 1, integer=True)
        _check_number(c, "max_steps", self.max_steps, 0, integer=True)
        _check_number(c, "eval_fraction", self.eval_fraction, 0.0, hi=0.9)
        _check_bool(c, "normalise", self.normalise)


@dataclass(frozen=True)
class SFTConfig(_ConfigMixin):
    """Hyperparameters of causal-LM pretraining / supervised fine-tuning."""

    learning_rate: float = 1e-3
    """AdamW peak learning rate (1e-3 for a ~1M-parameter model from scratch; ~1e-5 to fine-tune
    a large pretrained one)."""
    num_steps: int = 1000
    """Optimiser steps (full batches)."""
    batch_size: int = 32
    """Sequences per step."""
    max_length: int = 64
    """Tokens per sequence (static shape); longer examples lose their end. A GPT-2 model
    (learned positions) refuses more than its n_positions."""
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "cosine"
    """After warm-up: "constant", "linear" or "cosine" decay to min_lr_ratio * learning_rate."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    seed: int = 0
    """Seeds the example order."""
    eval_every: int = 0
    """Loss on the eval examples every this many steps (0 = only at the end)."""
    train_on_prompt: bool = False
    """(prompt, response) examples: also train on the prompt tokens (default: response only)."""
    append_eos: bool = True
    """Append EOS to every example, so the model learns to stop."""

    def __post_init__(self) -> None:
        c = "SFTConfig"
        _check_optim(c, self)
        _check_number(c, "num_steps", self.num_steps, 0, integer=True)
        _check_bool(c, "train_on_prompt", self.train_on_prompt)


def lr_factor(step: int, total_steps: int, config: RMConfig | SFTConfig) -> float:
    """Learning-rate multiplier of optimiser update `step` (0-based) of `total_steps`: linear
    warm-up (step + 1) / warmup_steps, then 1 ("constant") or a linear / cosine decay from 1 to
    min_lr_ratio at the last step (and min_lr_ratio after it)."""
    warm, lo = int(config.warmup_steps), float(config.min_lr_ratio)
    if step < warm:
        return (step + 1.0) / warm
    p = min(1.0, max(0.0, (step - warm) / max(1, int(total_steps) - warm - 1)))
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "linear":
        return 1.0 - (1.0 - lo) * p
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_at(step: int, total_steps: int, config: RMConfig | SFTConfig) -> float:
    """The learning rate of optimiser update `step`: learning_rate * `lr_factor`. Computed on
    the host and handed to the backend's step as a number (so a compiled JAX step serves any
    schedule and length)."""
    return float(config.learning_rate) * lr_factor(step, total_steps, config)


class NonFiniteTraining(RuntimeError):
    """Consecutive optimiser steps had a non-finite loss or gradient."""


# ---- tokenisation ------------------------------------------------------------------------------
def _token_lists(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (one batched tokenizer call)."""
    if not texts:
        return []
    uniq = list(dict.fromkeys(texts))
    enc = tokenizer(uniq, add_special_tokens=False)["input_ids"]
    table = dict(zip(uniq, enc))
    return [list(table[t]) for t in texts]


def _special_ids(tokenizer: Any, append_eos: bool) -> tuple[int | None, int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is None:
        raise UsageError("the tokenizer has no EOS token; set tokenizer.eos_token or use "
                         "append_eos=False")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos
    return (eos if append_eos else None), (0 if pad is None else int(pad))


def encode_sequences(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                     max_length: int, append_eos: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, n_truncated): int32 [N, max_length] of ids(prompt) + ids(response) (+ EOS),
    RIGHT-padded; a sequence longer than max_length keeps its LAST max_length tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos, pad = _special_ids(tokenizer, append_eos)
    p_ids, r_ids = _token_lists(tokenizer, prompts), _token_lists(tokenizer, responses)
    n = len(prompts)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    truncated = 0
    for i in range(n):
        seq = p_ids[i] + r_ids[i] + ([eos] if eos is not None else [])
        if not seq:
            raise UsageError(f"sequence {i} is empty (empty prompt and response, no EOS)")
        if len(seq) > max_length:
            truncated += 1
            seq = seq[-max_length:]
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return ids, mask, truncated


@dataclass
class PreferenceGroups:
    """Preference records as fixed-shape numpy groups (see the module docstring).

    input_ids, attention_mask  int32 [N, K, T]   slot k of group n; absent slots copy slot 0
    tiers                      int32 [N, K]      0 = best, 1 = next, ...; -1 = absent slot
    margin                     float32 [N]       bradley_terry margin (0 without margin_key)
    targets                    float32 [N]       standardised rating (loss="rating"), else 0
    prompts, responses         the texts, [N] and [N][K] (absent slots left out)
    records                    the source record of each group
    dropped                    records with nothing to learn (all tied, ties="drop")
    truncated                  sequences cut to max_length
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    tiers: np.ndarray
    margin: np.ndarray
    targets: np.ndarray
    prompts: list[str]
    responses: list[list[str]]
    records: list[Any]
    dropped: int = 0
    truncated: int = 0
    rating_mean: float | None = None
    rating_std: float | None = None

    def __len__(self) -> int:
        return int(self.tiers.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.tiers.shape[1])

    def batch(self, rows: np.ndarray, weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The arrays of groups `rows` as a batch dict (+ `weight`, 1 per row by default)."""
        rows = np.asarray(rows)
        w = np.ones(len(rows), np.float32) if weight is None else np.asarray(weight, np.float32)
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "tiers": self.tiers[rows], "margin": self.margin[rows],
                "targets": self.targets[rows], "weight": w}


def _groups_of(records: Sequence[Any], config: RMConfig) -> tuple[list[tuple], int]:
    """(prompt, responses, tiers, margin, rating, record) per usable record; count dropped."""
    from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord, ratings_to_pairs

    out: list[tuple] = []
    dropped = 0
    ratings = [r for r in records if isinstance(r, RatingRecord)]
    others = [r for r in records if not isinstance(r, RatingRecord)]
    if config.loss == "rating":
        if others:
            raise UsageError(f"loss='rating' trains on rating records; the data holds "
                             f"{len(others)} {type(others[0]).__name__}(s)")
        return [(r.prompt, [r.response], [0], 0.0, r.rating, r) for r in ratings], 0
    if ratings:  # preference losses: ratings become pairs of responses to the same prompt
        others += list(ratings_to_pairs(ratings, ties=config.ties))
    for i, rec in enumerate(others):
        if isinstance(rec, PairwiseRecord):
            responses, tiers = [rec.chosen, rec.rejected], [0, 0 if rec.tie else 1]
        elif isinstance(rec, RankingRecord):
            responses, tiers = list(rec.responses), [0] * len(rec.responses)
            for t, group in enumerate(rec.tiers):
                for j in group:
                    tiers[j] = t
        else:
            raise UsageError(f"record {i}: a {type(rec).__name__} holds no preference; reward-model "
                             f"training needs pairwise, ranking or rating records")
        if config.ties == "drop" and len(set(tiers)) == 1:
            dropped += 1
            continue
        margin = 0.0
        if config.margin_key is not None:
            m = rec.extra.get(config.margin_key)
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise UsageError(f"record {i} (prompt {rec.prompt[:40]!r}): extra[{config.margin_key!r}] "
                                 f"must be a finite number (margin_key is set), got {m!r}")
            margin = float(m)
        out.append((rec.prompt, responses, tiers, margin, 0.0, rec))
    return out, dropped


def encode_preferences(records: Iterable[Any], tokenizer: Any, config: RMConfig, *,
                       rating_stats: tuple[float, float] | None = None,
                       group_size: int | None = None) -> PreferenceGroups:
    """Tokenise preference records into `PreferenceGroups` (fixed shapes; module docstring).
    `rating_stats` = (mean, std) standardises ratings (default: this set's own -- pass the
    training set's when encoding an eval set); `group_size` pads groups to at least this K
    (so an eval set shares the training batches' shape)."""
    groups, dropped = _groups_of(list(records), config)
    if not groups:
        raise UsageError("no usable preference records" + (
            f" ({dropped} were all ties, dropped with ties='drop')" if dropped else ""))
    K = max(len(g[1]) for g in groups)
    K = max(K, group_size or 0)
    N, T = len(groups), config.max_length
    prompts = [g[0] for g in groups]
    flat_p = [g[0] for g in groups for _ in g[1]]
    flat_r = [r for g in groups for r in g[1]]
    ids_f, mask_f, truncated = encode_sequences(tokenizer, flat_p, flat_r, max_length=T,
                                                append_eos=config.append_eos)
    ids = np.zeros((N, K, T), np.int32)
    mask = np.zeros((N, K, T), np.int32)
    tiers = np.full((N, K), -1, np.int32)
    pos = 0
    for n, g in enumerate(groups):
        k = len(g[1])
        ids[n, :k], mask[n, :k] = ids_f[pos:pos + k], mask_f[pos:pos + k]
        ids[n, k:], mask[n, k:] = ids_f[pos], mask_f[pos]  # absent slots: copies of slot 0
        tiers[n, :k] = g[2]
        pos += k
    margin = np.asarray([g[3] for g in groups], np.float32)
    targets = np.zeros(N, np.float32)
    mean = std = None
    if config.loss == "rating":
        r = np.asarray([g[4] for g in groups], np.float64)
        mean, std = (float(r.mean()), float(r.std())) if rating_stats is None else rating_stats
        if not std > 0:
            raise UsageError("every rating is the same: there is nothing to regress on")
        targets = ((r - mean) / std).astype(np.float32)
    return PreferenceGroups(ids, mask, tiers, margin, targets, prompts, [list(g[1]) for g in groups],
                            [g[5] for g in groups], dropped, truncated, mean, std)


def reference_sequences(records: Iterable[Any]) -> tuple[list[str], list[str]]:
    """(prompts, responses) of every response in `records` (any record kind holding responses:
    pairwise, ranking, rating, responses) -- a reference set for reward normalisation."""
    from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord, ResponsesRecord

    prompts, responses = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, PairwiseRecord):
            rs = [rec.chosen, rec.rejected]
        elif isinstance(rec, (RankingRecord, ResponsesRecord)):
            rs = list(rec.responses)
        elif isinstance(rec, RatingRecord):
            rs = [rec.response]
        else:
            raise UsageError(f"record {i}: a {type(rec).__name__} holds no response to score")
        prompts += [rec.prompt] * len(rs)
        responses += rs
    return prompts, responses


@dataclass
class SFTData:
    """Examples as fixed-shape numpy arrays: input_ids, attention_mask, loss_mask int32 [N, T].
    loss_mask[n, t] = 1 where token t is a training target (predicted from tokens < t)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows],
                "loss_mask": self.loss_mask[rows]}


def _example(ex: Any, i: int) -> tuple[str | None, str]:
    """(prompt or None, text) of an example: a string, a (prompt, response) pair, or a dict with
    "text" or "prompt"/"response"."""
    if isinstance(ex, str):
        return None, ex
    if isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(x, str) for x in ex):
        return ex[0], ex[1]
    if isinstance(ex, Mapping):
        if isinstance(ex.get("text"), str):
            return None, ex["text"]
        if isinstance(ex.get("prompt"), str) and isinstance(ex.get("response"), str):
            return ex["prompt"], ex["response"]
    raise UsageError(f"example {i}: expected a text, a (prompt, response) pair or a dict with "
                     f'"text" or "prompt" and "response", got {type(ex).__name__}')


def encode_sft(examples: Iterable[Any], tokenizer: Any, config: SFTConfig) -> SFTData:
    """Tokenise SFT / pretraining examples (see `_example`) into `SFTData`: RIGHT-padded to
    max_length, truncated at the end (counted); loss on the response (+ EOS) of a pair, on every
    token after the first of a text, on everything after the first token with train_on_prompt."""
    parsed = [_example(ex, i) for i, ex in enumerate(examples)]
    if not parsed:
        raise UsageError("no training examples")
    eos, pad = _special_ids(tokenizer, config.append_eos)
    prompt_ids = _token_lists(tokenizer, [p or "" for p, _ in parsed])
    text_ids = _token_lists(tokenizer, [t for _, t in parsed])
    N, T = len(parsed), config.max_length
    ids = np.full((N, T), pad, np.int32)
    attn = np.zeros((N, T), np.int32)
    lmask = np.zeros((N, T), np.int32)
    truncated = 0
    for i, (p, _) in enumerate(parsed):
        pre = prompt_ids[i] if p is not None else []
        seq = pre + text_ids[i] + ([eos] if eos is not None else [])
        if len(seq) > T:
            truncated += 1
            seq = seq[:T]
        ids[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        first = 1 if (p is None or config.train_on_prompt) else max(1, len(pre))
        lmask[i, first:len(seq)] = 1
    if not lmask.any():
        raise UsageError("no example has a token to train on (responses are empty and "
                         "append_eos is off?)")
    return SFTData(ids, attn, lmask, truncated)


# ---- batch order ---------------------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n records in epoch `epoch`: a seeded permutation, a pure function of
    (seed, epoch)."""
    return _rng(seed, STREAM_RM_ORDER, epoch).permutation(n)


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
        out.append(int(_rng(seed, STREAM_SFT_ORDER, epoch).permutation(n)[k]))
    return np.asarray(out, np.int64)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded round(fraction * n) of n records held out (at least one
    when fraction > 0 and n >= 2), both sorted."""
    n_eval = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    perm = _rng(seed, STREAM_HOLDOUT).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


# ---- metrics -------------------------------------------------------------------------------------
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


# ---- a fresh GPT-2 -------------------------------------------------------------------------------
def init_gpt2_tensors(hf_config: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """GPT-2 weights under their Hugging Face names, drawn with numpy (so both backends start
    from the same model): GPT-2's init -- N(0, initializer_range) for embeddings and projections,
    N(0, initializer_range / sqrt(2 * n_layer)) for the residual output projections (attn.c_proj,
    mlp.c_proj), zero biases, unit LayerNorms. Embeddings tied to the LM head."""
    c = dict(hf_config)
    if c.get("model_type") != "gpt2":
        raise ValueError(f"init_gpt2_tensors: model_type must be 'gpt2', got {c.get('model_type')!r}")
    if not c.get("tie_word_embeddings", True):
        raise ValueError("init_gpt2_tensors: only tied embeddings are supported")
    rng = np.random.default_rng(seed)
    V, P, H, L = int(c["vocab_size"]), int(c["n_positions"]), int(c["n_embd"]), int(c["n_layer"])
    inner = int(c.get("n_inner") or 4 * H)
    std = float(c.get("initializer_range", 0.02))
    proj_std = std / math.sqrt(2 * L)

    def normal(shape, s):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    t = {"transformer.wte.weight": normal((V, H), std), "transformer.wpe.weight": normal((P, H), std)}
    for i in range(L):
        p = f"transformer.h.{i}."
        t[p + "ln_1.weight"], t[p + "ln_1.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
        t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"] = normal((H, 3 * H), std), np.zeros(3 * H, np.float32)
        t[p + "attn.c_proj.weight"], t[p + "attn.c_proj.bias"] = normal((H, H), proj_std), np.zeros(H, np.float32)
        t[p + "ln_2.weight"], t[p + "ln_2.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
        t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = normal((H, inner), std), np.zeros(inner, np.float32)
        t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = normal((inner, H), proj_std), np.zeros(H, np.float32)
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
    return t


def write_fresh_checkpoint(path: str | os.PathLike, hf_config: Mapping[str, Any], *, seed: int = 0,
                           tokenizer: Any = None) -> Path:
    """A freshly initialised GPT-2 (`init_gpt2_tensors`) as a Hugging Face checkpoint dir (+ the
    tokenizer, a `transformers` tokenizer, when given): loads in both backends and transformers."""
    from ppo_rlhf import hf_checkpoint as hfc

    path = Path(path)
    config = {**dict(hf_config), "architectures": [hfc.CAUSAL_LM_ARCH["gpt2"]], "dtype": "float32"}
    hfc.save_tensors(path, init_gpt2_tensors(config, seed))
    hfc.write_config(path, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def load_tokenizer_dir(path: str | os.PathLike) -> Any:
    """A transformers tokenizer from a dir that holds one (UsageError otherwise:
    `ppo_rlhf.trainer_common.load_tokenizer`)."""
    from ppo_rlhf.trainer_common import load_tokenizer

    if not Path(path).is_dir():
        raise UsageError(f"tokenizer directory {str(path)!r} does not exist")
    return load_tokenizer(path)


# ---- the host loop ---------------------------------------------------------------------------------
class _Loop:
    """What both supervised trainers share: tokenizer, out_dir, metrics, checkpoints."""

    backend = "?"
    config: Any

    def __init__(self, config: Any, *, tokenizer: Any, out_dir: Any, checkpoint_every: int,
                 keep_checkpoints: int, model_path: Any = None):
        if isinstance(checkpoint_every, bool) or int(checkpoint_every) < 0:
            raise UsageError(f"checkpoint_every must be an integer >= 0 (0 = only at the end), "
                             f"got {checkpoint_every!r}")
        self.config = config
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer_dir(tokenizer)
        elif tokenizer is None and isinstance(model_path, (str, os.PathLike)):
            tokenizer = load_tokenizer_dir(model_path)
        self.tokenizer = tokenizer
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every = int(checkpoint_every)
        self.keep_checkpoints = int(keep_checkpoints)
        self.step = 0
        self.applied = 0  # optimiser updates applied (skipped steps excluded)
        self.history: list[dict[str, Any]] = []
        self._bad = 0

    @property
    def checkpoints(self):
        from ppo_rlhf.ckpt import CheckpointManager

        return None if self.out_dir is None else CheckpointManager(self.out_dir / "checkpoints",
                                                                   keep=self.keep_checkpoints)

    def _check_model(self, model: Any) -> None:
        """The tokenizer's ids fit the model's vocabulary and max_length fits its positions
        (`ppo_rlhf.trainer_common.check_vocab`, `check_positions`): a clear error before any
        compilation, not a shape error inside it."""
        from ppo_rlhf.trainer_common import check_positions, check_vocab

        check_vocab(self.tokenizer, {"model": model.config.vocab_size})
        check_positions(self.config.max_length, "max_length",
                        "lower it (--max-length / the config's max_length)", [model.config])

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("text data needs a tokenizer: pass tokenizer= (or a model dir holding one)")
        return self.tokenizer

    def _start(self, resume: bool) -> Any:
        """Resume from the newest valid checkpoint (resume=True) and open out_dir/metrics.jsonl
        (records after the checkpoint's step are dropped; a fresh run starts a fresh log)."""
        if resume and self.checkpoints is not None:
            found = self.checkpoints.latest()
            if found is not None:
                path, state = found
                if state.get("backend") not in (None, self.backend):
                    raise UsageError(f"checkpoint was written by the {state['backend']} backend; "
                                     f"resume it with --backend {state['backend']}")
                self.load_checkpoint(path)
                self.step, self.applied = int(state["step"]), int(state["applied"])
        if self.out_dir is None:
            return None
        from ppo_rlhf.loop import MetricsWriter, read_metrics

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "train_config.json").write_text(self.config.to_json() + "\n")
        log = self.out_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(log) if r.get("step", 0) <= self.step] if (
            self.step and log.exists()) else []
        log.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return MetricsWriter(log)

    def _checkpoint(self, total: int) -> None:
        if self.checkpoints is None:
            return
        every = self.checkpoint_every
        if (every and self.step % every == 0) or self.step == total:
            self.checkpoints.save(self.step, self.save_checkpoint,
                                  {"step": self.step, "applied": self.applied,
                                   "backend": self.backend, "config": self.config.to_dict()})

    def _lr(self, total: int) -> float:
        """The learning rate of the next applied update (the schedule counts applied updates)."""
        return lr_at(self.applied, total, self.config)

    def _after_step(self, skipped: bool) -> None:
        self.applied += 0 if skipped else 1
        self._bad = self._bad + 1 if skipped else 0
        if self._bad >= 3:
            raise NonFiniteTraining(f"step {self.step}: {self._bad} consecutive optimiser steps had a "
                                    f"non-finite loss or gradient; stopping")

    # backend hooks
    def save_checkpoint(self, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_checkpoint(self, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_model(self, path: str | os.PathLike) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _save_tokenizer(self, path: str | os.PathLike) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))


def _fmt(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


class RMTrainerBase(_Loop):
    """The reward-model training loop; backends implement `_init_optimizer(total_steps)`,
    `_train_step(batch, lr) -> {loss, grad_norm, skipped, scores [B, K]}`,
    `_eval_step(batch) -> (per-row loss [B], scores [B, K])`, `_score(ids, mask) -> [N]`,
    `set_normalisation(gain, bias)`, `save_model`, `save_checkpoint`, `load_checkpoint`."""

    def encode(self, records: Iterable[Any], **kw: Any) -> PreferenceGroups:
        return encode_preferences(records, self._require_tokenizer(), self.config, **kw)

    def total_steps(self, n_train: int) -> int:
        cfg = self.config
        total = cfg.num_epochs * -(-n_train // cfg.batch_size)
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, data: PreferenceGroups) -> dict[str, float]:
        """Held-out loss (mean over groups) and pairwise accuracy (`group_accuracy`) of the
        current model; for loss="rating" the accuracy is over same-prompt rating pairs."""
        B = self.config.batch_size
        losses, scores = [], []
        for start in range(0, len(data), B):
            rows = np.arange(start, min(start + B, len(data)))
            w = np.ones(B, np.float32)
            w[len(rows):] = 0.0
            loss, s = self._eval_step(data.batch(np.resize(rows, B), w))
            losses.append(np.asarray(loss)[:len(rows)])
            scores.append(np.asarray(s)[:len(rows)])
        loss_all, s_all = np.concatenate(losses), np.concatenate(scores)
        out = {"loss": float(loss_all.mean())}
        if self.config.loss == "rating":
            acc, n = rating_pair_accuracy(data.prompts, [r.rating for r in data.records], s_all[:, 0])
        else:
            acc, n = group_accuracy(s_all, data.tiers)
        out.update(accuracy=acc, pairs=n)
        self._last_eval_scores = s_all
        return out

    def sequence_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Raw scores (gain 1, bias 0) of prompt + response sequences, float64 [N]; scored in
        fixed-size chunks (static shapes)."""
        cfg = self.config
        ids, mask, _ = encode_sequences(self._require_tokenizer(), prompts, responses,
                                        max_length=cfg.max_length, append_eos=cfg.append_eos)
        chunk = cfg.batch_size * self._group_size
        out = []
        for start in range(0, len(ids), chunk):
            rows = np.resize(np.arange(start, min(start + chunk, len(ids))), chunk)
            out.append(np.asarray(self._score(ids[rows], mask[rows]))[:min(chunk, len(ids) - start)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    # ---- training ------------------------------------------------------------------------------
    def fit(self, train: Iterable[Any] | PreferenceGroups, eval: Iterable[Any] | PreferenceGroups | None = None, *,
            reference: tuple[Sequence[str], Sequence[str]] | None = None, progress: bool = True,
            resume: bool = False, eval_noise_ceiling: float | None = None) -> dict[str, Any]:
        """Train on `train` (records or encoded groups), evaluate on `eval`, normalise on
        `reference` = (prompts, responses) (default: every training sequence), save the model to
        out_dir. Returns the final metrics (also written to out_dir/metrics.json)."""
        from ppo_rlhf.trainer_common import _progress

        cfg = self.config
        t0 = time.perf_counter()
        train_g = train if isinstance(train, PreferenceGroups) else self.encode(train)
        eval_g = None
        if eval is not None:
            eval_g = eval if isinstance(eval, PreferenceGroups) else self.encode(
                eval, rating_stats=(train_g.rating_mean, train_g.rating_std) if cfg.loss == "rating" else None,
                group_size=train_g.group_size)
        self._group_size = max(train_g.group_size, eval_g.group_size if eval_g else 1)
        total = self.total_steps(len(train_g))
        self._init_optimizer(total)
        writer = self._start(resume)
        per_epoch = -(-len(train_g) // cfg.batch_size)
        epoch_losses: list[float] = []
        last_eval: dict[str, float] | None = None
        bar = _progress(total, self.step, progress, f"reward model ({self.backend})")
        try:
            while self.step < total:
                rows, weight, epoch = rm_batch_rows(cfg.seed, self.step, len(train_g), cfg.batch_size)
                batch = train_g.batch(rows, weight)
                lr = self._lr(total)
                out = self._train_step(batch, lr)
                self._after_step(bool(out["skipped"]))
                acc, _ = group_accuracy(out["scores"], batch["tiers"], weight)
                if self.step % per_epoch == 0:
                    epoch_losses = []
                epoch_losses.append(float(out["loss"]))
                self.step += 1
                rec = {"step": self.step, "epoch": epoch, "train/loss": float(out["loss"]),
                       "train/accuracy": acc, "train/grad_norm": float(out["grad_norm"]),
                       "train/lr": lr, "train/skipped": bool(out["skipped"])}
                end_of_epoch = self.step % per_epoch == 0 or self.step == total
                if eval_g is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                           or end_of_epoch):
                    last_eval = self.evaluate(eval_g)
                    rec.update({"eval/loss": last_eval["loss"], "eval/accuracy": last_eval["accuracy"]})
                if writer is not None:
                    writer.write(_jsonable(rec))
                self.history.append(rec)
                bar.update(1)
                post = {"loss": _fmt(rec["train/loss"])}
                if last_eval is not None:
                    post["eval_acc"] = _fmt(last_eval["accuracy"])
                bar.set_postfix(post, refresh=False)
                self._checkpoint(total)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if eval_g is not None and (last_eval is None or total == 0):
            last_eval = self.evaluate(eval_g)
        # the final model on the whole training set: accuracy, and the normalisation reference
        flat_p = [p for p, rs in zip(train_g.prompts, train_g.responses) for _ in rs]
        flat_r = [r for rs in train_g.responses for r in rs]
        train_scores = self.sequence_scores(flat_p, flat_r)
        grouped = np.zeros(train_g.tiers.shape)
        pos = 0
        for n, rs in enumerate(train_g.responses):
            grouped[n, :len(rs)] = train_scores[pos:pos + len(rs)]
            pos += len(rs)
        if cfg.loss == "rating":
            train_acc, _ = rating_pair_accuracy(train_g.prompts, [r.rating for r in train_g.records],
                                                grouped[:, 0])
        else:
            train_acc, _ = group_accuracy(grouped, train_g.tiers)
        gain, bias = 1.0, 0.0
        if cfg.normalise:
            ref = train_scores if reference is None else self.sequence_scores(*reference)
            gain, bias = normalisation(ref)
        self.set_normalisation(gain, bias)
        metrics: dict[str, Any] = {
            "backend": self.backend, "loss_kind": cfg.loss, "steps": self.step,
            "epochs": cfg.num_epochs, "num_train": len(train_g),
            "num_eval": 0 if eval_g is None else len(eval_g),
            "dropped_ties": train_g.dropped + (eval_g.dropped if eval_g else 0),
            "truncated": train_g.truncated + (eval_g.truncated if eval_g else 0),
            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
            "train_accuracy": train_acc,
            "eval_loss": None if last_eval is None else last_eval["loss"],
            "eval_accuracy": None if last_eval is None else last_eval["accuracy"],
            "eval_pairs": None if last_eval is None else last_eval["pairs"],
            "reward_gain": gain, "reward_bias": bias,
            "normalised_on": None if not cfg.normalise else (
                "train" if reference is None else f"{len(reference[0])} given sequences"),
            "time_s": time.perf_counter() - t0,
        }
        if cfg.loss == "rating":
            metrics.update(rating_mean=train_g.rating_mean, rating_std=train_g.rating_std)
        if eval_g is not None:
            ceiling = eval_noise_ceiling
            if ceiling is None:
                ceiling = _noise_ceiling_or_none(eval_g.records)
            metrics["noise_ceiling"] = ceiling
            metrics["eval_expected_accuracy"] = _expected_accuracy_or_none(
                eval_g.records, self._last_eval_scores) if last_eval is not None else None
        metrics["train_noise_ceiling"] = _noise_ceiling_or_none(train_g.records)
        if self.out_dir is not None:
            self.save_model(self.out_dir)
            (self.out_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2,
                                                                  sort_keys=True) + "\n")
        self.metrics = metrics
        return metrics


def _noise_ceiling_or_none(records: Sequence[Any]) -> float | None:
    """The synthetic labeller's noise ceiling of these records, or None when they don't carry
    its metadata (real human labels, ratings, ...)."""
    from ppo_rlhf.labeller import noise_ceiling

    try:
        return noise_ceiling(records)
    except (ValueError, TypeError, KeyError):
        return None


def _expected_accuracy_or_none(records: Sequence[Any], scores: np.ndarray) -> float | None:
    """`ppo_rlhf.labeller.expected_accuracy` of the scores [N, K] of these records (group order =
    the record's response order), or None when the records don't carry the labeller's gold."""
    from ppo_rlhf.labeller import expected_accuracy

    try:
        return expected_accuracy(records, scores)
    except (ValueError, TypeError, KeyError):
        return None


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics dict as strict JSON values: numpy scalars as Python ones, NaN / inf as None."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


class SFTTrainerBase(_Loop):
    """The pretraining / SFT loop; backends implement `_init_optimizer(total_steps)`,
    `_train_step(batch, lr) -> {loss, tokens, grad_norm, skipped}`, `_eval_step(batch) ->
    (loss_sum, tokens)`, `save_model`, `save_checkpoint`, `load_checkpoint`."""

    def encode(self, examples: Iterable[Any]) -> SFTData:
        return encode_sft(examples, self._require_tokenizer(), self.config)

    def evaluate(self, data: SFTData) -> float:
        """Mean next-token loss over every target token of `data` (fixed-size chunks)."""
        B = self.config.batch_size
        total, tokens = 0.0, 0.0
        for start in range(0, len(data), B):
            rows = np.arange(start, min(start + B, len(data)))
            batch = data.batch(np.resize(rows, B))
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][len(rows):] = 0  # repeated rows count once
            s, n = self._eval_step(batch)
            total, tokens = total + float(s), tokens + float(n)
        return total / max(tokens, 1.0)

    def fit(self, train: Iterable[Any] | SFTData, eval: Iterable[Any] | SFTData | None = None, *,
            progress: bool = True, resume: bool = False) -> dict[str, Any]:
        """Train `config.num_steps` steps on `train` (examples or `SFTData`), evaluate on `eval`,
        save the model (+ tokenizer) to out_dir. Returns the final metrics (also written to
        out_dir/metrics.json)."""
        from ppo_rlhf.trainer_common import _progress

        cfg = self.config
        t0 = time.perf_counter()
        data = train if isinstance(train, SFTData) else self.encode(train)
        eval_d = None if eval is None else (eval if isinstance(eval, SFTData) else self.encode(eval))
        total = cfg.num_steps
        self._init_optimizer(total)
        writer = self._start(resume)
        losses: list[float] = []
        tokens = 0
        eval_loss = None
        t_steps, steps_timed = 0.0, 0
        bar = _progress(total, self.step, progress, f"SFT ({self.backend})")
        try:
            while self.step < total:
                rows = sft_batch_indices(cfg.seed, self.step, len(data), cfg.batch_size)
                lr = self._lr(total)
                ts = time.perf_counter()
                out = self._train_step(data.batch(rows), lr)
                loss = float(out["loss"])  # blocks on the step
                if self.step > 0:  # the first step includes compilation
                    t_steps += time.perf_counter() - ts
                    steps_timed += 1
                self._after_step(bool(out["skipped"]))
                losses.append(loss)
                tokens += int(out["tokens"])
                self.step += 1
                rec = {"step": self.step, "train/loss": loss, "train/grad_norm": float(out["grad_norm"]),
                       "train/lr": lr, "train/tokens": int(out["tokens"]),
                       "train/skipped": bool(out["skipped"])}
                if eval_d is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                           or self.step == total):
                    eval_loss = self.evaluate(eval_d)
                    rec["eval/loss"] = eval_loss
                if writer is not None:
                    writer.write(_jsonable(rec))
                self.history.append(rec)
                bar.update(1)
                bar.set_postfix({"loss": _fmt(loss)}, refresh=False)
                self._checkpoint(total)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if eval_d is not None and eval_loss is None:
            eval_loss = self.evaluate(eval_d)
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        metrics: dict[str, Any] = {
            "backend": self.backend, "steps": self.step, "num_examples": len(data),
            "truncated": data.truncated,
            "final_loss": float(np.mean(tail)) if tail else math.nan,
            "first_loss": losses[0] if losses else math.nan,
            "eval_loss": eval_loss, "train_tokens": tokens,
            "time_s": time.perf_counter() - t0,
            "step_time_s": t_steps / steps_timed if steps_timed else math.nan,
        }
        if self.out_dir is not None:
            self.save_model(self.out_dir)
            (self.out_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2,
                                                                  sort_keys=True) + "\n")
        self.metrics = metrics
        return metrics


def print_err(*a: Any) -> None:
    print(*a, file=sys.stderr)
