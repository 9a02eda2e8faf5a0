"""The synthetic labeller: Bradley-Terry pair labels, Plackett-Luce rankings, noisy ratings, and
the noise ceiling it reports, checked against their defining formulas by simulation.

Statistical tolerances: each check compares a mean of N independent Bernoulli draws with its
expectation, and allows 4 standard deviations (sqrt(sum q(1-q)) / N). A correct labeller fails
such a check with probability < 1e-4 -- and never in practice, since every draw is seeded -- while
the mistakes the checks are meant to catch (a flipped sign, a missing temperature, T vs 1/T)
move the means by many standard deviations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppo_rlhf.data import PairwiseRecord, ranking_to_pairs
from ppo_rlhf.feedback.labeller import (
    SyntheticLabeller,
    expected_accuracy,
    noise_ceiling,
    pair_noise_ceiling,
    preference_probability,
)
from ppo_rlhf.rewards import NonFiniteRewardError


def numeric_gold(prompts, responses):
    """Gold = the number written in the response (so tests choose gold scores directly)."""
    return [float(r) for r in responses]


def texts(xs) -> list[str]:
    """Numbers as exact decimal strings (repr of a Python float round-trips)."""
    return [repr(float(x)) for x in xs]


def four_sigma(q: np.ndarray) -> float:
    return 4.0 * math.sqrt(float(np.sum(q * (1.0 - q)))) / q.size


def test_preference_probability_formula():
    assert preference_probability(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_probability(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(2)))
    assert preference_probability(2.0, 2.0, 3.0) == 0.5
    # no overflow for huge gaps
    assert preference_probability(1e6, 0.0, 1e-3) == 1.0
    assert preference_probability(0.0, 1e6, 1e-3) == 0.0
    np.testing.assert_array_equal(preference_probability([1, 0, 2], [0, 1, 2], 0.0), [1, 0, 0.5])
    assert pair_noise_ceiling([1, 0, 2], [0, 1, 2], 0.0) == pytest.approx((1 + 1 + 0.5) / 3)


def test_temperature_zero_agrees_with_gold_and_flips_coins_on_ties():
    rng = np.random.default_rng(1)
    a = rng.normal(size=500).round(1)
    b = rng.normal(size=500).round(1)
    lab = SyntheticLabeller(numeric_gold, temperature=0, seed=0)
    out = lab.label_pairs(["p"] * 500, [str(x) for x in a], [str(x) for x in b])
    decided = a != b
    np.testing.assert_array_equal(out.a_won[decided], (a > b)[decided])
    for rec in out.records:
        assert float(rec.chosen) >= float(rec.rejected)
    assert out.noise_ceiling == pytest.approx((decided.sum() + 0.5 * (~decided).sum()) / 500)
    # ties: a fair coin
    ties = SyntheticLabeller(numeric_gold, temperature=0, seed=3).label_pairs(
        ["p"] * 4000, ["1"] * 4000, ["1"] * 4000)
    assert abs(ties.a_won.mean() - 0.5) < four_sigma(np.full(4000, 0.5))
    assert ties.noise_ceiling == 0.5


def test_empirical_agreement_matches_the_reported_ceiling_and_the_bt_probabilities():
    n = 20000
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=n), rng.normal(size=n)
    temperature = 0.7
    lab = SyntheticLabeller(numeric_gold, temperature=temperature, seed=5)
    out = lab.label_pairs(["p"] * n, texts(a), texts(b))
    p = 1.0 / (1.0 + np.exp(-(a - b) / temperature))
    np.testing.assert_allclose(out.p_a, p, rtol=1e-12)
    q = np.maximum(p, 1 - p)
    assert out.noise_ceiling == pytest.approx(q.mean(), rel=1e-12)
    # the best predictor (predict the gold-better one) agrees with the labels at the ceiling rate
    agree = (out.a_won == (a > b)).mean()
    assert abs(agree - out.noise_ceiling) < four_sigma(q), (agree, out.noise_ceiling)
    # and within bins of p, a wins at rate p (calibration, which a flipped sign or a wrong
    # temperature would break even where the ceiling happens to match)
    for lo, hi in [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]:
        m = (p >= lo) & (p < hi)
        assert abs(out.a_won[m].mean() - p[m].mean()) < four_sigma(p[m])
    # the records say the same as the arrays
    for i in range(50):
        rec = out.records[i]
        assert (rec.chosen, rec.rejected) == ((repr(float(a[i])), repr(float(b[i]))) if out.a_won[i]
                                              else (repr(float(b[i])), repr(float(a[i]))))
        assert rec.extra["meta"]["gold_chosen"] == float(rec.chosen)


def test_noise_ceiling_of_a_subset_of_records():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=300)
    out = SyntheticLabeller(numeric_gold, temperature=0.5, seed=0).label_pairs(
        ["p"] * 300, texts(a), texts(b))
    assert noise_ceiling(out.records) == pytest.approx(out.noise_ceiling, rel=1e-12)
    held_out = out.records[200:]
    assert noise_ceiling(held_out) == pytest.approx(pair_noise_ceiling(a[200:], b[200:], 0.5))
    with pytest.raises(ValueError, match="not labelled by SyntheticLabeller"):
        noise_ceiling([PairwiseRecord("p", "a", "b")])


def test_expected_accuracy_is_the_mean_accuracy_over_relabellings():
    """expected_accuracy(records, scores) = the accuracy against the labels, averaged over the
    labeller's noise: checked against its extremes and by relabelling the same pairs many times."""
    n = 400
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=n), rng.normal(size=n)
    temperature = 0.6
    out = SyntheticLabeller(numeric_gold, temperature=temperature, seed=1).label_pairs(
        ["p"] * n, texts(a), texts(b))
    gold = [[float(r.chosen), float(r.rejected)] for r in out.records]
    # ranking by gold reaches the ceiling, the reverse order its complement, a constant 1/2
    assert expected_accuracy(out.records, gold) == pytest.approx(out.noise_ceiling, rel=1e-12)
    assert expected_accuracy(out.records, [[-x, -y] for x, y in gold]) == pytest.approx(
        1.0 - out.noise_ceiling, rel=1e-12)
    assert expected_accuracy(out.records, np.zeros((n, 2))) == 0.5
    # an imperfect scorer (gold plus noise): its measured accuracy, averaged over 300 fresh
    # labellings of the same pairs, matches the expectation
    score = {x: x + rng.normal(scale=0.8) for x in np.concatenate([a, b])}
    says_a = np.array([score[x] > score[y] for x, y in zip(a, b)])
    p_a = preference_probability(a, b, temperature)
    expect = float(np.mean(np.where(says_a, p_a, 1.0 - p_a)))
    scores = [[score[float(r.chosen)], score[float(r.rejected)]] for r in out.records]
    assert expected_accuracy(out.records, scores) == pytest.approx(expect, rel=1e-12)
    lab = SyntheticLabeller(numeric_gold, temperature=temperature, seed=2)
    measured = [np.mean(lab.label_pairs(["p"] * n, texts(a), texts(b)).a_won == says_a)
                for _ in range(300)]
    q = np.where(says_a, p_a, 1.0 - p_a)
    assert abs(np.mean(measured) - expect) < four_sigma(np.tile(q, 300)), (np.mean(measured), expect)
    # rankings: every pair of the K responses, in the record's response order
    rk = SyntheticLabeller(numeric_gold, temperature=temperature, seed=3).label_rankings(
        ["p"] * 50, [texts(rng.normal(size=3)) for _ in range(50)])
    assert expected_accuracy(rk.records, rk.gold) == pytest.approx(rk.noise_ceiling, rel=1e-12)
    # bad input
    with pytest.raises(ValueError, match="2 records but 1 rows"):
        expected_accuracy(out.records[:2], gold[:1])
    with pytest.raises(ValueError, match="not labelled by SyntheticLabeller"):
        expected_accuracy([PairwiseRecord("p", "a", "b")], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="not all finite"):
        expected_accuracy(out.records[:1], [[math.nan, 0.0]])


def test_plackett_luce_first_place_frequencies_match_softmax():
    gold = np.array([0.0, 0.5, 1.0, -1.0])
    temperature = 0.5
    lab = SyntheticLabeller(numeric_gold, temperature=temperature, seed=11)
    n = 20000
    orders = np.array([lab.rank(gold) for _ in range(n)])
    softmax = np.exp(gold / temperature) / np.exp(gold / temperature).sum()
    for i in range(4):
        freq = (orders[:, 0] == i).mean()
        assert abs(freq - softmax[i]) < four_sigma(np.full(n, softmax[i])), (i, freq, softmax[i])
    # second place given first: softmax over the rest (the "and so on" of Plackett-Luce)
    first2 = orders[:, 0] == 2
    rest = np.array([0, 1, 3])
    sm_rest = np.exp(gold[rest] / temperature) / np.exp(gold[rest] / temperature).sum()
    for i, s in zip(rest, sm_rest):
        freq = (orders[first2, 1] == i).mean()
        assert abs(freq - s) < four_sigma(np.full(first2.sum(), s))
    # pairwise marginals are the Bradley-Terry probabilities (so ranking pairs share the ceiling)
    pos = np.argsort(orders, axis=1)  # pos[:, i] = place of response i
    p01 = preference_probability(gold[1], gold[0], temperature)
    assert abs((pos[:, 1] < pos[:, 0]).mean() - p01) < four_sigma(np.full(n, p01))


def test_label_rankings_records_and_ceiling():
    lab = SyntheticLabeller(numeric_gold, temperature=0, seed=0)
    out = lab.label_rankings(["p", "q"], [["0.1", "0.9", "0.5"], ["2", "2", "-1"]])
    assert out.records[0].ranking == (1, 2, 0)
    assert out.records[1].ranking[2] == 2 and set(out.records[1].ranking[:2]) == {0, 1}
    # 6 pairs: 3 + 2 decided, 1 tied
    assert out.noise_ceiling == pytest.approx((5 + 0.5) / 6)
    assert noise_ceiling(out.records) == pytest.approx(out.noise_ceiling)
    pairs = ranking_to_pairs(out.records[0])
    assert [(x.chosen, x.rejected) for x in pairs] == [("0.9", "0.5"), ("0.9", "0.1"),
                                                       ("0.5", "0.1")]
    with pytest.raises(ValueError, match="same K >= 2"):
        lab.label_rankings(["p", "q"], [["1", "2"], ["1", "2", "3"]])


def test_ratings_noise_and_scale():
    n = 20000
    gold = np.linspace(-1, 1, n)
    prompts, responses = ["p"] * n, texts(gold)
    exact = SyntheticLabeller(numeric_gold, seed=0).label_ratings(prompts[:5], responses[:5])
    assert [r.rating for r in exact] == pytest.approx(gold[:5].tolist())
    noisy = SyntheticLabeller(numeric_gold, rating_noise=0.3, seed=0).label_ratings(prompts, responses)
    resid = np.array([r.rating for r in noisy]) - gold
    # sample std of 20000 normals is within ~1% (4 sigma: 4 / sqrt(2n) = 2%) of the true 0.3
    assert abs(resid.std() / 0.3 - 1) < 0.02 and abs(resid.mean()) < 4 * 0.3 / math.sqrt(n)
    lab = SyntheticLabeller(numeric_gold, rating_scale=5, rating_range=(-1, 1), seed=0)
    scaled = np.array([r.rating for r in lab.label_ratings(prompts, responses)])
    assert set(scaled.tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.all(np.diff(scaled) >= 0)  # noiseless: monotone in gold
    assert scaled[0] == 1 and scaled[-1] == 5 and scaled[n // 2] == 3
    with pytest.raises(ValueError, match="rating_range"):
        SyntheticLabeller(numeric_gold, rating_scale=5)


def test_seeded_and_deterministic():
    def run(seed):
        lab = SyntheticLabeller(numeric_gold, temperature=1.0, seed=seed, rating_noise=0.1)
        pairs = lab.label_pairs(["p"] * 50, [str(i % 7) for i in range(50)],
                                [str(i % 5) for i in range(50)]).records
        ranks = lab.label_rankings(["p"] * 10, [["1", "2", "3"]] * 10).records
        rates = lab.label_ratings(["p"] * 10, ["1"] * 10)
        return pairs, ranks, rates

    assert run(7) == run(7)
    assert run(7) != run(8)
    gen = np.random.default_rng(7)
    assert SyntheticLabeller(numeric_gold, seed=gen).rng is gen


def test_bad_gold_and_arguments_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        SyntheticLabeller(numeric_gold, temperature=-1)
    with pytest.raises(TypeError, match="callable"):
        SyntheticLabeller("gold")  # type: ignore[arg-type]
    lab = SyntheticLabeller(lambda p, r: [float("nan")] * len(r))
    with pytest.raises(NonFiniteRewardError):
        lab.label_pairs(["p"], ["a"], ["b"])
    lab = SyntheticLabeller(lambda p, r: [0.0])
    with pytest.raises(ValueError, match="returned"):
        lab.label_pairs(["p", "q"], ["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="as many"):
        SyntheticLabeller(numeric_gold).label_pairs(["p"], ["1", "2"], ["1"])
