"""Preference records and SFT examples as fixed-shape numpy batches (backend-neutral).

Reward model (`encode_preferences` -> `PreferenceGroups`)
----------------------------------------------------------
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
model's expected accuracy there (`ppo_rlhf.feedback.labeller.expected_accuracy`: the same accuracy
in expectation over the label noise, a lower-variance estimate). Without an eval set, a seeded
`eval_fraction` of the prompts is held out with all their records
(`runtime.split.grouped_holdout_split`). After training, with `normalise=True`, reward_gain and
reward_bias are set so that the scores of a reference set (default: every training sequence) have
mean 0 and standard deviation 1 (`normalisation`); they are saved in config.json under "ppo_rlhf"
(`ppo_rlhf.hf_checkpoint`).

Pretraining / SFT (`encode_sft` -> `SFTData`)
---------------------------------------------
An example is plain text (loss on every token after the first) or a (prompt, response) pair
(loss on the response tokens and EOS only, unless `train_on_prompt`); ids = ids(text) + [EOS] or
ids(prompt) + ids(response) + [EOS], RIGHT-padded to `max_length`, truncated at the END. The
loss is the next-token cross-entropy averaged over the target tokens of the batch. Training runs
`num_steps` full batches drawn from seeded per-epoch permutations (`sft_batch_indices`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ppo_rlhf.config import RMConfig, SFTConfig
from ppo_rlhf.data.convert import ratings_to_pairs
from ppo_rlhf.data.records import PairwiseRecord, RankingRecord, RatingRecord, ResponsesRecord
from ppo_rlhf.errors import UsageError
from ppo_rlhf.tokens import pad_and_eos


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
    """(EOS to append or None, pad id) by the one pad / EOS rule (`ppo_rlhf.tokens.pad_and_eos`)."""
    pad, eos = pad_and_eos(tokenizer)
    if append_eos and eos is None:
        raise UsageError("the tokenizer has no EOS token; set tokenizer.eos_token or use "
                         "append_eos=False")
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


__all__ = ["encode_sequences", "PreferenceGroups", "encode_preferences", "reference_sequences",
           "SFTData", "encode_sft"]
