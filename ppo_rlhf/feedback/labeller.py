"""A synthetic labeller: the stand-in for people, driven by a gold reward function.

Given `gold(prompts, responses) -> floats` (higher is better) and a `temperature` T >= 0:

* pairs (Bradley-Terry):  P(a > b) = sigma((g(a) - g(b)) / T). At T = 0 the better response
  always wins and equal gold scores are decided by a fair coin.
* rankings of K (Plackett-Luce): the best is drawn with P(i) = softmax(g / T)_i, then the best of
  the rest, and so on. Sampled as the order of g/T + Gumbel noise (the Gumbel-max trick). At T = 0,
  the gold order, ties broken uniformly at random. Plackett-Luce's pairwise marginals are exactly
  the Bradley-Terry probabilities above (Luce's choice axiom), so rankings converted to pairs
  (`ppo_rlhf.data.ranking_to_pairs`) are labelled with the same noise as pairs.
* ratings: g + N(0, rating_noise^2); with `rating_scale=N`, mapped linearly from
  `rating_range=(lo, hi)` onto 1..N, rounded to the nearest integer and clipped to 1..N.

The noise ceiling of a set of labelled pairs is the expected accuracy of the best possible
predictor (one that knows the gold reward and predicts the likelier winner):
mean over pairs of max(p, 1 - p). A reward model's held-out accuracy against these labels can
approach it but not beat it, except by chance. `LabelledPairs.noise_ceiling` reports it for the
pairs just labelled; `noise_ceiling(records)` recomputes it for any subset (e.g. a held-out split)
from the gold scores the labeller stores in each record's `extra["meta"]`. `expected_accuracy`
gives a scorer's accuracy on such records in expectation over the label noise (the quantity the
measured held-out accuracy estimates, without its coin flips).

All randomness comes from one `numpy.random.Generator` seeded at construction: the same seed and
the same sequence of calls give the same labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord
from ppo_rlhf.rewards import RewardFn, check_scores

__all__ = ["SyntheticLabeller", "LabelledPairs", "LabelledRankings", "preference_probability",
           "pair_noise_ceiling", "noise_ceiling", "expected_accuracy", "SYNTHETIC_LABELS"]


def preference_probability(gold_a: Any, gold_b: Any, temperature: float) -> np.ndarray:
    """P(a > b) = sigma((g_a - g_b) / T), elementwise; at T = 0: 1, 0, or 0.5 on equal scores."""
    d = np.asarray(gold_a, dtype=np.float64) - np.asarray(gold_b, dtype=np.float64)
    if temperature == 0:
        return np.where(d > 0, 1.0, np.where(d < 0, 0.0, 0.5))
    return 0.5 * (1.0 + np.tanh(d / (2.0 * temperature)))  # = sigma(d / T), without overflow


def pair_noise_ceiling(gold_a: Any, gold_b: Any, temperature: float) -> float:
    """Expected accuracy of the best predictor on these pairs: mean of max(p, 1 - p)."""
    p = preference_probability(gold_a, gold_b, temperature)
    if p.size == 0:
        raise ValueError("no pairs: the noise ceiling of an empty set is undefined")
    return float(np.mean(np.maximum(p, 1.0 - p)))


def _gold_pairs(records: Iterable[PairwiseRecord | RankingRecord], what: str
                ) -> tuple[list[tuple[int, int, int]], np.ndarray, np.ndarray, float]:
    """Every pair of responses of records written by `SyntheticLabeller`: (record, response i,
    response j) with i < j in the record's response order ((chosen, rejected) for a pair, the
    listed responses for a ranking), their gold scores, and the labeller's temperature."""
    pairs: list[tuple[int, int, int]] = []
    a: list[float] = []
    b: list[float] = []
    temps: set[float] = set()
    for n, rec in enumerate(records):
        meta = rec.extra.get("meta") if isinstance(rec.extra.get("meta"), dict) else {}
        if meta.get("labeller") != "synthetic" or "temperature" not in meta:
            raise ValueError(f"record {n} was not labelled by SyntheticLabeller (no gold scores "
                             f"in extra['meta'])")
        temps.add(float(meta["temperature"]))
        if isinstance(rec, PairwiseRecord):
            g = [meta["gold_chosen"], meta["gold_rejected"]]
        elif isinstance(rec, RankingRecord):
            g = meta["gold"]
        else:
            raise TypeError(f"record {n}: {type(rec).__name__} has no {what}")
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                pairs.append((n, x, y))
                a.append(g[x])
                b.append(g[y])
    if len(temps) > 1:
        raise ValueError(f"records mix labeller temperatures {sorted(temps)}")
    if not temps:
        raise ValueError(f"no records: the {what} of an empty set is undefined")
    return pairs, np.asarray(a, np.float64), np.asarray(b, np.float64), temps.pop()


def noise_ceiling(records: Iterable[PairwiseRecord | RankingRecord]) -> float:
    """The noise ceiling of records written by `SyntheticLabeller` (any subset of them, e.g. a
    held-out split), from the gold scores and temperature in their `extra["meta"]`. A ranking
    counts as its K(K-1)/2 pairs. Raises ValueError for a record without that information."""
    _, a, b, temperature = _gold_pairs(records, "noise ceiling")
    return pair_noise_ceiling(a, b, temperature)


def expected_accuracy(records: Sequence[PairwiseRecord | RankingRecord],
                      scores: Sequence[Sequence[float]]) -> float:
    """The accuracy a scorer would have, in expectation over the labeller's noise, on the pairs of
    these `SyntheticLabeller` records: mean over pairs of P(the labeller prefers the response the
    scorer ranks higher), 1/2 for equal scores. `scores[n][j]` is the score of response j of record
    n in its order -- (chosen, rejected) for a pair, the listed responses for a ranking.

    It is what the measured held-out accuracy estimates, without the coin flips of the labels
    (so with a smaller variance on a small held-out set); the noise ceiling is its maximum,
    reached by ranking every pair by gold. Raises ValueError for records without the labeller's
    gold scores."""
    records = list(records)
    if len(scores) != len(records):
        raise ValueError(f"expected_accuracy: {len(records)} records but {len(scores)} rows of scores")
    pairs, a, b, temperature = _gold_pairs(records, "expected accuracy")
    p = preference_probability(a, b, temperature)  # P(response i beats response j)
    d = np.asarray([float(scores[n][i]) - float(scores[n][j]) for n, i, j in pairs], np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("expected_accuracy: the scores are not all finite")
    return float(np.mean(np.where(d > 0, p, np.where(d < 0, 1.0 - p, 0.5))))


@dataclass(frozen=True)
class LabelledPairs:
    """The result of `SyntheticLabeller.label_pairs`.

    records       one PairwiseRecord per input pair (chosen = the winner)
    gold_a/gold_b gold scores of the inputs a and b            float64 [N]
    p_a           P(a > b) under the labeller's noise model    float64 [N]
    a_won         whether a was labelled the winner            bool    [N]
    """

    records: list[PairwiseRecord]
    gold_a: np.ndarray
    gold_b: np.ndarray
    p_a: np.ndarray
    a_won: np.ndarray

    @property
    def noise_ceiling(self) -> float:
        """Expected accuracy of the best possible predictor on these pairs: mean max(p, 1-p)."""
        return float(np.mean(np.maximum(self.p_a, 1.0 - self.p_a)))


@dataclass(frozen=True)
class LabelledRankings:
    """The result of `SyntheticLabeller.label_rankings`: one RankingRecord per prompt, the gold
    scores [N, K], and the noise ceiling over all K(K-1)/2 pairs of every ranking."""

    records: list[RankingRecord]
    gold: np.ndarray
    noise_ceiling: float


class SyntheticLabeller:
    """Labels responses as a noisy person would, from a gold reward (see the module docstring).

    gold           `gold(prompts, responses) -> one float per response`, higher is better
    temperature    T >= 0 of the Bradley-Terry / Plackett-Luce noise (0 = noiseless)
    seed           an int or a numpy Generator; every draw comes from it
    rating_noise   standard deviation of the Gaussian noise added to ratings
    rating_scale   None (ratings are real numbers) or N: integer ratings 1..N
    rating_range   (lo, hi): the gold values mapped to 1 and N (required with rating_scale)
    """

    def __init__(self, gold: RewardFn, *, temperature: float = 1.0,
                 seed: int | np.random.Generator = 0, rating_noise: float = 0.0,
                 rating_scale: int | None = None, rating_range: tuple[float, float] | None = None):
        if not callable(gold):
            raise TypeError(f"gold must be callable(prompts, responses) -> floats, got "
                            f"{type(gold).__name__}")
        for name, v in (("temperature", temperature), ("rating_noise", rating_noise)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}={v!r} is invalid: allowed a finite number >= 0")
        if rating_scale is not None:
            if isinstance(rating_scale, bool) or not isinstance(rating_scale, int) or rating_scale < 2:
                raise ValueError(f"rating_scale={rating_scale!r} is invalid: allowed None or an "
                                 f"integer >= 2")
            if (rating_range is None or len(rating_range) != 2
                    or not all(math.isfinite(x) for x in rating_range)
                    or not rating_range[0] < rating_range[1]):
                raise ValueError(f"rating_scale needs rating_range=(lo, hi) with lo < hi, got "
                                 f"{rating_range!r}")
        self.gold = gold
        self.temperature = float(temperature)
        self.rating_noise = float(rating_noise)
        self.rating_scale = rating_scale
        self.rating_range = rating_range
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    # -- gold ------------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Gold scores as float64 [N], checked: one finite float per response."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        raw = self.gold(list(prompts), list(responses))
        check_scores(raw, len(prompts), source="gold reward")
        return np.asarray(raw, dtype=np.float64).reshape(-1)

    def _meta(self, **gold: Any) -> dict[str, Any]:
        return {"meta": {"labeller": "synthetic", "temperature": self.temperature, **gold}}

    # -- pairs -----------------------------------------------------------------------------------
    def label_pairs(self, prompts: Sequence[str], responses_a: Sequence[str],
                    responses_b: Sequence[str]) -> LabelledPairs:
        """Label pair i = (responses_a[i], responses_b[i]) to prompts[i] by Bradley-Terry."""
        n = len(prompts)
        if not (len(responses_a) == len(responses_b) == n):
            raise ValueError(f"label_pairs needs as many responses_a ({len(responses_a)}) and "
                             f"responses_b ({len(responses_b)}) as prompts ({n})")
        g = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
        ga, gb = g[:n], g[n:]
        p = preference_probability(ga, gb, self.temperature)
        a_won = self.rng.random(n) < p  # p = 1 / 0 always / never wins; p = 0.5 is the coin
        records = []
        for i in range(n):
            win, lose, gw, gl = ((responses_a[i], responses_b[i], ga[i], gb[i]) if a_won[i]
                                 else (responses_b[i], responses_a[i], gb[i], ga[i]))
            records.append(PairwiseRecord(prompts[i], win, lose, extra=self._meta(
                gold_chosen=float(gw), gold_rejected=float(gl))))
        return LabelledPairs(records, ga, gb, p, a_won)

    # -- rankings --------------------------------------------------------------------------------
    def rank(self, gold: np.ndarray) -> np.ndarray:
        """One Plackett-Luce draw: indices from best to worst for the scores `gold` [K]."""
        gold = np.asarray(gold, dtype=np.float64)
        if self.temperature == 0:
            # sort by gold, descending; a random secondary key breaks ties uniformly
            return np.lexsort((self.rng.random(gold.size), -gold))
        keys = gold / self.temperature + self.rng.gumbel(size=gold.size)
        return np.argsort(-keys, kind="stable")

    def label_rankings(self, prompts: Sequence[str],
                       responses: Sequence[Sequence[str]]) -> LabelledRankings:
        """Rank the K responses of each prompt (K >= 2, the same K for every prompt)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} lists of responses")
        ks = {len(r) for r in responses}
        if len(ks) > 1 or (ks and min(ks) < 2):
            raise ValueError(f"label_rankings needs the same K >= 2 responses per prompt, got "
                             f"{sorted(ks)}")
        k = ks.pop() if ks else 2
        flat_p = [p for p in prompts for _ in range(k)]
        flat_r = [r for rs in responses for r in rs]
        gold = self.score(flat_p, flat_r).reshape(len(prompts), k)
        records = []
        a: list[float] = []
        b: list[float] = []
        for i, prompt in enumerate(prompts):
            order = self.rank(gold[i])
            records.append(RankingRecord(prompt, tuple(responses[i]),
                                         tuple(int(j) for j in order),
                                         extra=self._meta(gold=[float(x) for x in gold[i]])))
            for x in range(k):
                for y in range(x + 1, k):
                    a.append(gold[i, x])
                    b.append(gold[i, y])
        ceiling = pair_noise_ceiling(a, b, self.temperature) if a else float("nan")
        return LabelledRankings(records, gold, ceiling)

    # -- ratings ---------------------------------------------------------------------------------
    def rating_of(self, gold: np.ndarray) -> np.ndarray:
        """Noisy (and, with `rating_scale`, discretised) ratings for gold scores."""
        gold = np.asarray(gold, dtype=np.float64)
        r = gold + self.rating_noise * self.rng.standard_normal(gold.shape)
        if self.rating_scale is not None:
            lo, hi = self.rating_range  # type: ignore[misc]
            n = self.rating_scale
            r = np.clip(np.rint(1 + (n - 1) * (r - lo) / (hi - lo)), 1, n)
        return r

    def label_ratings(self, prompts: Sequence[str], responses: Sequence[str]) -> list[RatingRecord]:
        """Rate each response (one RatingRecord per input)."""
        gold = self.score(prompts, responses)
        ratings = self.rating_of(gold)
        return [RatingRecord(p, r, float(x), extra=self._meta(gold=float(g)))
                for p, r, x, g in zip(prompts, responses, ratings, gold)]


class _SyntheticLabelQuality:
    """The `ppo_rlhf.runtime.supervised.LabelQuality` of records written by `SyntheticLabeller`:
    reward-model training reports their noise ceiling and expected accuracy through it."""

    noise_ceiling = staticmethod(noise_ceiling)
    expected_accuracy = staticmethod(expected_accuracy)


SYNTHETIC_LABELS = _SyntheticLabelQuality()
