"""Parity of the PPO math: the same random numpy inputs go into the plain-numpy reference
(`reference.py`), `ppo_jax` and `ppo_torch`; values AND gradients must agree -- float64 to 1e-12,
float32 to ~1e-6 relative (see `backends.TOL`).

Inputs are drawn by hypothesis: random batch sizes and lengths (rows with a single token, long
rows), right- and left-padded masks, NaN written into every padded position (it must not leak),
log-ratios from tiny to far outside [1 - eps, 1 + eps] on both sides, advantages of both signs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity_tests import reference as ref
from parity_tests.backends import BACKENDS, assert_close, assert_close_scaled, assert_stats_close, tol
from ppo_rlhf.config import KL_LOSS_KINDS, LOSS_AGGS
from ppo_rlhf.kl_control import adaptive_kl_update

DTYPES = [np.float64, np.float32]
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass
class Batch:
    mask: np.ndarray  # int32 0/1
    logprobs: np.ndarray
    old_logprobs: np.ndarray
    advantages: np.ndarray
    values: np.ndarray
    old_values: np.ndarray
    returns: np.ndarray
    scores: np.ndarray

    def astype(self, dtype) -> "Batch":
        """Cast floats to `dtype`; NaN in every padded position (must be ignored everywhere)."""
        out = {}
        for f in dataclasses.fields(self):
            a = getattr(self, f.name)
            if f.name == "mask":
                out[f.name] = a
            elif a.ndim == 2:
                out[f.name] = np.where(self.mask == 1, a, np.nan).astype(dtype)
            else:
                out[f.name] = a.astype(dtype)
        return Batch(**out)


@st.composite
def batches(draw, layout=None, allow_empty_rows=False):
    # A few shapes only: each new shape costs a jit compilation (most of these tests' time);
    # the masks inside vary freely. One row and several; one token, a few, many.
    b = draw(st.sampled_from([1, 5]))
    t = draw(st.sampled_from([1, 3, 64]))
    layout = layout or draw(st.sampled_from(["right", "left"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lengths = rng.integers(1, t + 1, size=b)
    lengths[rng.random(b) < 0.25] = 1  # single-token rows are common at EOS-heavy batches
    if allow_empty_rows and b > 1:
        lengths[rng.random(b) < 0.2] = 0
        lengths[rng.integers(b)] = max(1, lengths.max())
    pos = np.arange(t)[None, :]
    mask = (pos < lengths[:, None]) if layout == "right" else (pos >= t - lengths[:, None])
    # log-ratio scale: near 1 (inside the band), moderate, or far outside on both sides
    scale = draw(st.sampled_from([0.01, 0.3, 2.0]))
    logprobs = -rng.exponential(2.0, size=(b, t))
    old_logprobs = logprobs + rng.normal(0.0, scale, size=(b, t))
    values = rng.normal(size=(b, t))
    return Batch(
        mask=mask.astype(np.int32),
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=rng.normal(size=(b, t)) * draw(st.sampled_from([0.1, 1.0, 10.0])),
        values=values,
        old_values=values + rng.normal(0.0, scale, size=(b, t)),
        returns=rng.normal(size=(b, t)),
        scores=rng.normal(size=b),
    )


POLICY_OPTIONS = [
    dict(kind="pg"),
    dict(kind="is"),
    dict(kind="clip"),
    dict(kind="clip", clip_eps=0.1),
    dict(kind="clip", clip_eps=0.2, clip_eps_high=0.28),
    dict(kind="clip", dual_clip=3.0),
    dict(kind="clip", clip_eps_high=0.3, dual_clip=2.0, loss_agg="seq-mean-token-mean"),
    dict(kind="pg", loss_agg="seq-mean-token-mean"),
    dict(kind="is", loss_agg="seq-mean-token-mean"),
    dict(kind="pg", loss_agg="seq-mean-token-sum-norm"),
    dict(kind="clip", clip_eps_high=0.28, loss_agg="seq-mean-token-sum-norm"),
    # GSPO: one length-normalised ratio per sequence, clipped per sequence
    dict(kind="clip", importance_level="sequence"),
    dict(kind="clip", clip_eps=0.1, importance_level="sequence", loss_agg="seq-mean-token-mean"),
    dict(kind="is", importance_level="sequence", loss_agg="seq-mean-token-mean"),
    dict(kind="clip", dual_clip=3.0, importance_level="sequence", loss_agg="seq-mean-token-sum-norm"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", POLICY_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@SETTINGS
@given(data=batches(allow_empty_rows=True))
def test_policy_loss(dtype, opts, data):
    d = data.astype(dtype)
    ref_in = [np.nan_to_num(a.astype(np.float64)) for a in (d.logprobs, d.old_logprobs, d.advantages)]
    want_loss, want_grad, want_stats = ref.policy_loss(*ref_in, data.mask, **opts)
    for backend in BACKENDS:
        loss, grad, stats = backend.value_and_grad("policy_loss", "losses", 0, d.logprobs,
                                                   d.old_logprobs, d.advantages, data.mask, **opts)
        what = f"{backend.name} {opts} {np.dtype(dtype).name}"
        assert loss.dtype == dtype, what
        assert_close(loss, want_loss, dtype, what + " loss")
        assert_close(grad, want_grad, dtype, what + " d loss / d logprobs")
        assert_stats_close(stats, want_stats, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(clip_eps=0.05), dict(clip_eps=None),
                                  dict(loss_agg="seq-mean-token-mean"), dict(loss_agg="seq-mean-token-sum-norm")],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@SETTINGS
@given(data=batches(allow_empty_rows=True))
def test_value_loss(dtype, opts, data):
    d = data.astype(dtype)
    ref_in = [np.nan_to_num(a.astype(np.float64)) for a in (d.values, d.old_values, d.returns)]
    want_loss, want_grad, want_stats = ref.value_loss(*ref_in, data.mask, **opts)
    for backend in BACKENDS:
        loss, grad, stats = backend.value_and_grad("value_loss", "losses", 0, d.values,
                                                   d.old_values, d.returns, data.mask, **opts)
        what = f"{backend.name} {opts} {np.dtype(dtype).name}"
        assert_close(loss, want_loss, dtype, what + " loss")
        assert_close(grad, want_grad, dtype, what + " d loss / d values")
        if np.isnan(want_stats["explained_variance"]):  # Var(R) = 0, e.g. a single real token
            assert np.isnan(stats["explained_variance"]), what
            stats = {k: v for k, v in stats.items() if k != "explained_variance"}
            assert_stats_close(stats, {k: v for k, v in want_stats.items() if k != "explained_variance"}, dtype, what)
        else:
            assert_stats_close(stats, want_stats, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@SETTINGS
@given(data=batches())
def test_kl_penalty_and_shape_rewards(dtype, kind, data):
    d = data.astype(dtype)
    lp, ref_lp = np.nan_to_num(d.logprobs.astype(np.float64)), np.nan_to_num(d.old_logprobs.astype(np.float64))
    want_kl = ref.kl_penalty(lp, ref_lp, kind) * data.mask
    want_rewards, _ = ref.shape_rewards(d.scores.astype(np.float64), lp, ref_lp, data.mask, 0.07, kind)
    # d KL / d log p, by hand: k1 -> 1, k2 -> d, k3 -> 1 - exp(-d)  (d = log p - log q)
    diff = lp - ref_lp
    want_grad = {"k1": np.ones_like(diff), "k2": diff, "k3": 1 - np.exp(-diff)}[kind] * data.mask
    for backend in BACKENDS:
        what = f"{backend.name} {kind} {np.dtype(dtype).name}"
        kl = backend.call("kl_penalty", "losses", d.logprobs, d.old_logprobs, kind=kind, mask=data.mask)
        assert_close(kl, want_kl, dtype, what + " kl")
        rewards, kl2 = backend.call("shape_rewards", "advantages", d.scores, d.logprobs,
                                    d.old_logprobs, data.mask, 0.07, kl_estimator=kind)
        assert_close(rewards, want_rewards, dtype, what + " shaped rewards")
        assert_close(kl2, want_kl, dtype, what + " kl from shape_rewards")
        # gradient of sum_t KL_t w.r.t. the policy log-probs
        _, grad, _ = backend.value_and_grad("kl_penalty", "losses", 0, d.logprobs, d.old_logprobs,
                                            kind=kind, mask=data.mask, weights=np.ones_like(d.logprobs))
        assert_close(grad, want_grad, dtype, what + " d sum(KL) / d logprobs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["right", "left"])
@SETTINGS
@given(data=batches(), gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.5, 0.0]))
def test_gae(dtype, layout, data, gamma, lam):
    if layout == "left":  # the same rows, real tokens moved to the end of each row
        t = data.mask.shape[1]
        lengths = data.mask.sum(1)
        mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.int32)
        data = dataclasses.replace(data, mask=mask)
    d = data.astype(dtype)
    rewards = d.advantages  # any numbers will do as rewards
    r64, v64 = np.nan_to_num(rewards.astype(np.float64)), np.nan_to_num(d.values.astype(np.float64))
    want_adv, want_ret = ref.gae(r64, v64, data.mask, gamma, lam)
    # Tolerance relative to the size of the sums the recurrence carries (ref.gae_magnitude), not
    # to A_t alone: A_t = delta_t + gamma lam A_{t+1} over up to 64 steps can cancel to a small
    # value whose float32 rounding error is that of partial sums ~30 (seen: |A| 0.5, error 8.5e-6
    # = 3e-7 of M_t, on gamma=1, lam=0.95, 64 steps; each backend sums in its own order).
    magnitude = ref.gae_magnitude(r64, v64, data.mask, gamma, lam)
    weights = np.random.default_rng(0).normal(size=data.mask.shape).astype(dtype)
    grads = []
    for backend in BACKENDS:
        what = f"{backend.name} gamma={gamma} lam={lam} {np.dtype(dtype).name}"
        adv, ret = backend.call("gae", "advantages", rewards, d.values, data.mask, gamma=gamma, lam=lam)
        assert_close_scaled(adv, want_adv, magnitude, dtype, what + " advantages")
        assert_close_scaled(ret, want_ret, magnitude + np.abs(v64), dtype, what + " returns")
        _, g, _ = backend.value_and_grad("gae", "advantages", 1, rewards, d.values, data.mask,
                                         output=0, weights=weights, gamma=gamma, lam=lam)
        assert np.all(np.isfinite(g)), what
        grads.append(g)
    # GAE is linear in the values: both backends' gradients of sum(w * A) must agree.
    assert_close(grads[0], grads[1], dtype, "d sum(w * A) / d values: jax vs torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [False, True])
@SETTINGS
@given(data=batches())
def test_whiten_mean_var(dtype, shift_mean, unbiased, data):
    d = data.astype(dtype)
    x = d.advantages
    x64 = np.nan_to_num(x.astype(np.float64))
    if unbiased and data.mask.sum() < 2:
        return  # unbiased variance of one token is undefined (an error; tested in test_math_bad_input)
    want = ref.whiten(x64, data.mask, shift_mean, unbiased)
    grads = []
    for backend in BACKENDS:
        what = f"{backend.name} shift_mean={shift_mean} unbiased={unbiased}"
        assert_close(backend.call("whiten", "masked", x, data.mask, shift_mean=shift_mean,
                                  unbiased=unbiased), want, dtype, what)
        assert_close(backend.call("masked_mean", "masked", x, data.mask), ref.masked_mean(x64, data.mask), dtype, what)
        assert_close(backend.call("masked_var", "masked", x, data.mask, unbiased=unbiased),
                     ref.masked_var(x64, data.mask, unbiased), dtype, what)
        weights = np.random.default_rng(1).normal(size=x.shape).astype(dtype)
        _, g, _ = backend.value_and_grad("whiten", "masked", 0, x, data.mask, weights=weights,
                                         shift_mean=shift_mean, unbiased=unbiased)
        grads.append(g)
    # d whiten(x)_i / dx_j = (delta_ij - 1/n) / sigma - (x_i - m)(x_j - m) / (n sigma^3): terms of
    # size ~1/sigma that cancel (exactly, for n = 2), so the rounding error of the sum scales with
    # sum|w| / sigma, not with the (possibly tiny) result. Tolerance relative to that scale.
    sigma = np.sqrt(ref.masked_var(x64, data.mask, unbiased) + 1e-8)
    scale = np.abs(weights).sum() / sigma
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=scale * tol(dtype)["rtol"],
                               err_msg="d sum(w * whiten(x)) / dx: jax vs torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(1, 1, 5), (2, 3, 11), (3, 8, 64)]))
def test_logprobs_and_entropy(dtype, temperature, seed, shape):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=shape) * 3).astype(dtype)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    mask = np.ones(shape[:-1], dtype=np.int32)
    mask[0, -1] = 0 if shape[1] > 1 else 1
    want_lp = ref.logprobs_from_logits(logits.astype(np.float64), labels, temperature)
    want_h = ref.token_entropy(logits.astype(np.float64), temperature)
    grads = []
    for backend in BACKENDS:
        what = f"{backend.name} T={temperature}"
        assert_close(backend.call("logprobs_from_logits", "losses", logits, labels, temperature=temperature),
                     want_lp, dtype, what)
        assert_close(backend.call("token_entropy", "losses", logits, temperature=temperature), want_h, dtype, what)
        assert_close(backend.call("entropy", "losses", logits, mask, temperature=temperature),
                     ref.masked_mean(want_h, mask), dtype, what)
        _, g, _ = backend.value_and_grad("entropy", "losses", 0, logits, mask, temperature=temperature)
        grads.append(g)
    assert_close(grads[0], grads[1], dtype, "d entropy / d logits: jax vs torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("units", ["seq-sum", "token-mean"])
@SETTINGS
@given(data=batches(), kl_coef=st.floats(0.001, 1.0), n=st.integers(1, 512))
def test_kl_controller(dtype, units, data, kl_coef, n):
    d = data.astype(dtype)
    kl = np.nan_to_num(d.logprobs.astype(np.float64) - d.old_logprobs.astype(np.float64)) * data.mask
    want_kl = (kl.sum(1).mean() if units == "seq-sum" else ref.masked_mean(kl, data.mask))
    for backend in BACKENDS:
        got_kl = backend.call("kl_for_controller", "advantages", np.where(data.mask == 1, kl, np.nan).astype(dtype),
                              data.mask, units=units)
        assert_close(got_kl, want_kl, dtype, f"{backend.name} kl_for_controller {units}")
    # the controller itself is host-side numpy, one implementation for both (ppo_rlhf.kl_control)
    for target in (0.5, 6.0):
        got = adaptive_kl_update(kl_coef, want_kl, n, target=target, horizon=1000)
        assert got == pytest.approx(ref.adaptive_kl_update(kl_coef, want_kl, n, target, 1000),
                                    rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@SETTINGS
@given(data=batches(allow_empty_rows=True))
def test_aggregate_loss(dtype, loss_agg, data):
    d = data.astype(dtype)
    want = ref.aggregate(np.nan_to_num(d.returns.astype(np.float64)), data.mask, loss_agg)
    for backend in BACKENDS:
        assert_close(backend.call("aggregate_loss", "masked", d.returns, data.mask, loss_agg=loss_agg),
                     want, dtype, f"{backend.name} {loss_agg}")


@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)], ids=["eps=0.2", "gspo-paper-eps"])
def test_sequence_ratio_is_gspos_objective(clip):
    """GSPO written from the paper, per sequence, not per token: s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|),
    J = mean_i min(s_i A_i, clip(s_i, 1 - eps_lo, 1 + eps_hi) A_i), one advantage per sequence;
    d(-J)/d log pi(y_i,t) = -A_i s_i / (|y_i| N) where the unclipped term is the smaller, else 0.
    policy_loss(importance_level="sequence", loss_agg="seq-mean-token-mean") must be -J, both
    backends, float64. Log-ratios around +-1e-3 so that the paper's tight band clips some rows."""
    rng = np.random.default_rng(7)
    b, t = 8, 6
    lengths = np.array([1, 2, 6, 3, 6, 4, 5, 1])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    logprobs = -rng.exponential(1.0, size=(b, t))
    old = logprobs + rng.normal(0.0, 1e-3 if clip[0] < 0.01 else 0.3, size=(b, t))
    adv_seq = rng.normal(size=b)
    adv = np.repeat(adv_seq[:, None], t, axis=1)
    lo, hi = clip
    s_i = np.array([np.prod(np.exp(logprobs[i, :n] - old[i, :n])) ** (1.0 / n) for i, n in enumerate(lengths)])
    unclipped, clipped = s_i * adv_seq, np.clip(s_i, 1 - lo, 1 + hi) * adv_seq
    want_loss = -np.mean(np.minimum(unclipped, clipped))
    active = unclipped <= clipped
    want_grad = np.where(mask == 1, (np.where(active, -adv_seq * s_i, 0.0) / (lengths * b))[:, None], 0.0)
    assert 0 < active.sum() < b or clip[0] > 0.01  # the paper's band clips some rows, not all
    for backend in BACKENDS:
        loss, grad, _ = backend.value_and_grad(
            "policy_loss", "losses", 0, np.where(mask == 1, logprobs, np.nan), np.where(mask == 1, old, np.nan),
            np.where(mask == 1, adv, np.nan), mask, kind="clip", clip_eps=lo, clip_eps_high=hi,
            importance_level="sequence", loss_agg="seq-mean-token-mean")
        assert_close(loss, want_loss, np.float64, f"{backend.name} GSPO loss")
        assert_close(grad, want_grad, np.float64, f"{backend.name} GSPO gradient")


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n_micro=st.sampled_from([2, 3, 6]))
def test_aggregation_count_makes_accumulation_exact(loss_agg, seed, n_micro):
    """Micro-batches m of a minibatch M weighted by aggregation_count(m) / aggregation_count(M):
    sum_m w_m * aggregate_loss(m) = aggregate_loss(M) and the same for the gradient w.r.t. the
    per-token losses, in float64 to 1e-12, in both backends -- with rows of very different
    lengths and empty rows. A micro-batch without a real token adds nothing: its weight is 0, or
    (seq-mean-token-sum-norm) its rows count but its loss is 0. The counts equal the reference's."""
    rng = np.random.default_rng(seed)
    b, t = 12, 7
    lengths = rng.integers(0, t + 1, size=b)
    lengths[rng.random(b) < 0.3] = 0
    lengths[rng.integers(b)] = t
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    losses = rng.normal(size=(b, t)) * rng.choice([0.1, 1.0, 10.0], size=(b, 1))
    losses = np.where(mask == 1, losses, np.nan)  # padding never counts
    want = ref.aggregate(np.nan_to_num(losses), mask, loss_agg)
    want_grad = ref.aggregation_weights(mask, loss_agg)
    rows = np.split(rng.permutation(b), n_micro)
    for backend in BACKENDS:
        what = f"{backend.name} {loss_agg} {n_micro} micro-batches"
        total = float(backend.call("aggregation_count", "masked", mask, loss_agg=loss_agg))
        assert total == ref.aggregation_count(mask, loss_agg), what
        acc, grad = 0.0, np.zeros((b, t))
        for r in rows:
            count = float(backend.call("aggregation_count", "masked", mask[r], loss_agg=loss_agg))
            assert count == ref.aggregation_count(mask[r], loss_agg), what
            if not mask[r].any():  # weight 0 (token-mean, seq-mean-token-mean) or loss 0 (sum-norm)
                assert count == (mask[r].shape[0] if loss_agg == "seq-mean-token-sum-norm" else 0), what
                continue
            loss, g, _ = backend.value_and_grad("aggregate_loss", "masked", 0, losses[r], mask[r], loss_agg=loss_agg)
            acc += count / total * float(loss)
            grad[r] += count / total * g
        assert_close(acc, want, np.float64, what + " loss")
        assert_close(grad, want_grad, np.float64, what + " d loss / d per-token losses")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), g=st.sampled_from([1, 2, 3, 8]), prompts=st.sampled_from([1, 4]),
       scores_kind=st.sampled_from(["normal", "binary", "offset"]))
def test_group_advantages(dtype, kind, seed, g, prompts, scores_kind):
    """Normal scores, 0/1 scores (verifiable rewards: ties and all-equal groups are common) and
    scores far from 0 (the mean must be removed without losing the spread)."""
    if kind == "rloo" and g == 1:
        return  # an error (tests/test_math_bad_input.py)
    rng = np.random.default_rng(seed)
    scores = {"normal": rng.normal(size=prompts * g),
              "binary": rng.integers(0, 2, size=prompts * g).astype(np.float64),
              "offset": 100.0 + rng.normal(size=prompts * g)}[scores_kind].astype(dtype)
    want = ref.group_advantages(scores.astype(np.float64), g, kind)
    # float32: the error of s_i - mean is relative to |s| (100 for "offset"), then divided by the
    # std for grpo (the std is >= ~0.1 here except for all-equal groups, where both sides give 0).
    scale = np.abs(scores.astype(np.float64)).max() + 1.0
    if kind == "grpo":
        group = scores.astype(np.float64).reshape(-1, g)
        std = np.sqrt(((group - group.mean(1, keepdims=True)) ** 2).sum(1) / max(g - 1, 1))
        scale = scale / np.repeat(np.where(std > 0, std, 1.0), g)
    for backend in BACKENDS:
        got = backend.call("group_advantages", "advantages", scores, num_generations=g, kind=kind)
        what = f"{backend.name} {kind} G={g} {scores_kind}"
        assert got.dtype == dtype and got.shape == scores.shape, what
        assert_close_scaled(got, want, scale * np.ones_like(want), dtype, what)
        if g == 1 and kind != "rloo":
            assert np.all(got == 0), what + ": a lone sample's advantage is 0"


def test_grpo_std_is_torch_std():
    """The GRPO std is torch.std's default (unbiased, divisor G - 1), as TRL's and verl's are; an
    independent check of the reference and both backends on hand-picked groups."""
    import torch

    scores = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0])
    groups = torch.tensor(scores).reshape(3, 3)
    want = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1).numpy()
    assert np.all(want[6:] == 0)  # all-equal group
    np.testing.assert_allclose(ref.group_advantages(scores, 3, "grpo"), want, rtol=1e-14, atol=1e-14)
    for backend in BACKENDS:
        np.testing.assert_allclose(backend.call("group_advantages", "advantages", scores, num_generations=3,
                                                kind="grpo"), want, rtol=1e-14, atol=1e-14)
    # RLOO by hand: 1 - (2 + 4) / 2 = -2
    assert ref.group_advantages(scores, 3, "rloo")[0] == -2.0


def _reinforce_scale(rewards64, mask, gamma):
    """The size of the reward-to-go sums, and that divided by the whitening std: the float32
    error of G_t is relative to the sums of |r| it adds up, that of A_t to those over sigma."""
    magnitude = ref.discounted_reward_to_go(np.abs(rewards64), mask, gamma)
    returns = ref.discounted_reward_to_go(rewards64, mask, gamma)
    sigma = np.sqrt(ref.masked_var(returns, mask) + 1e-8)
    return magnitude, (magnitude + magnitude.max()) / sigma


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=batches(), gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]))
def test_reinforce_pp_returns(dtype, data, gamma):
    d = data.astype(dtype)
    lp, ref_lp = (np.nan_to_num(a.astype(np.float64)) for a in (d.logprobs, d.old_logprobs))
    rewards64, _ = ref.shape_rewards(d.scores.astype(np.float64), lp, ref_lp, data.mask, 0.05, "k2")
    rewards = np.where(data.mask == 1, rewards64, np.nan).astype(dtype)
    rewards64 = np.nan_to_num(rewards.astype(np.float64))
    want_adv, want_ret = ref.reinforce_pp_returns(rewards64, data.mask, gamma)
    magnitude, adv_scale = _reinforce_scale(rewards64, data.mask, gamma)
    for backend in BACKENDS:
        what = f"{backend.name} gamma={gamma} {np.dtype(dtype).name}"
        adv, ret = backend.call("reinforce_pp_returns", "advantages", rewards, data.mask, gamma=gamma)
        assert_close_scaled(ret, want_ret, magnitude, dtype, what + " returns")
        assert_close_scaled(adv, want_adv, adv_scale, dtype, what + " advantages")
        assert np.all(adv[data.mask == 0] == 0) and np.all(ret[data.mask == 0] == 0), what


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=batches(), gamma=st.sampled_from([1.0, 0.9]), kl_estimator=st.sampled_from(["k1", "k2"]),
       groups=st.sampled_from([1, 2, 5]))
def test_reinforce_pp_baseline(dtype, data, gamma, kl_estimator, groups):
    # the rows twice over (2 or 10 rows; the copies get their own scores): 1, 2 or 5 prompts
    data = Batch(**{f.name: np.concatenate([getattr(data, f.name)] * 2) for f in dataclasses.fields(data)})
    data.scores[len(data.scores) // 2:] = np.random.default_rng(len(data.scores)).normal(size=len(data.scores) // 2)
    b = data.mask.shape[0]
    g = b // groups if b % groups == 0 and b // groups >= 2 else b  # G >= 2 samples per prompt
    d = data.astype(dtype)
    lp, ref_lp = (np.nan_to_num(a.astype(np.float64)) for a in (d.logprobs, d.old_logprobs))
    want_adv, want_ret, want_kl = ref.reinforce_pp_baseline(d.scores.astype(np.float64), lp, ref_lp, data.mask,
                                                            0.05, g, gamma, kl_estimator)
    rewards64, _ = ref.shape_rewards(ref.group_advantages(d.scores.astype(np.float64), g, "dr_grpo"), lp, ref_lp,
                                     data.mask, 0.05, kl_estimator)
    magnitude, adv_scale = _reinforce_scale(rewards64, data.mask, gamma)
    for backend in BACKENDS:
        what = f"{backend.name} G={g} gamma={gamma} {kl_estimator} {np.dtype(dtype).name}"
        adv, ret, kl = backend.call("reinforce_pp_baseline", "advantages", d.scores, d.logprobs, d.old_logprobs,
                                    data.mask, 0.05, num_generations=g, gamma=gamma, kl_estimator=kl_estimator)
        assert_close_scaled(ret, want_ret, magnitude + 1.0, dtype, what + " returns")
        assert_close_scaled(adv, want_adv, adv_scale + 1.0, dtype, what + " advantages")
        assert_close(kl, want_kl * data.mask, dtype, what + " kl")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KL_LOSS_KINDS)
@SETTINGS
@given(data=batches(allow_empty_rows=True))
def test_kl_loss(dtype, kind, data):
    """Values and gradients of each KL-in-the-loss estimator against the hand-written ones; the
    straight-through kinds' values are k1's / k3's bit for bit."""
    d = data.astype(dtype)
    lp, ref_lp = np.nan_to_num(d.logprobs.astype(np.float64)), np.nan_to_num(d.old_logprobs.astype(np.float64))
    want, want_grad = ref.kl_loss(lp, ref_lp, kind)
    for backend in BACKENDS:
        what = f"{backend.name} {kind} {np.dtype(dtype).name}"
        got = backend.call("kl_loss", "losses", d.logprobs, d.old_logprobs, kind=kind, mask=data.mask)
        assert_close(got, want * data.mask, dtype, what + " value")
        if kind.endswith("+"):
            same = backend.call("kl_penalty", "losses", d.logprobs, d.old_logprobs, kind=kind[:-1], mask=data.mask)
            np.testing.assert_array_equal(got, same, err_msg=what)
        _, grad, _ = backend.value_and_grad("kl_loss", "losses", 0, d.logprobs, d.old_logprobs, kind=kind,
                                            mask=data.mask, weights=np.ones_like(d.logprobs))
        assert_close(grad, want_grad * data.mask, dtype, what + " d sum / d logprobs")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_steps_match_the_reference(dtype):
    """Both backends' optimiser (`make_optimizer`) against a float64 AdamW written out in numpy,
    step by step, on well-conditioned gradients (|g| in [0.5, 2]: no entry near 0, where Adam
    would amplify rounding) at learning rate 1, so that each step moves a parameter by O(1).
    float64: 1e-12. float32: after t steps each entry is within 4 t ulp(max(|p|, 1)): a step
    rounds p at most twice (decay, update) and its direction (Adam's ~10 ops on values of ~1)
    by about one ulp of 1 (measured <= 2.1 t ulp in both backends). optax's own float32 bias
    correction, 1 - b2^t from b2 rounded to float32, was 70 t ulp off (`ppo_jax/optim.py`)."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from ppo_jax.optim import make_optimizer as jax_optimizer
    from ppo_torch.optim import make_optimizer as torch_optimizer

    rng = np.random.default_rng(0)
    p0 = rng.normal(size=256).astype(dtype)
    grads = [(rng.choice([-1.0, 1.0], 256) * rng.uniform(0.5, 2.0, 256)).astype(dtype) for _ in range(12)]
    kw = dict(learning_rate=1.0, adam_eps=1e-8, weight_decay=0.01)
    expected = ref.adamw(p0, grads, lr=1.0, weight_decay=0.01, eps=1e-8)

    runs = {}
    with jax.enable_x64(dtype == np.float64):
        tx, p = jax_optimizer(**kw), jnp.asarray(p0)
        state, runs["jax"] = tx.init(p), []
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, p)
            p = optax.apply_updates(p, updates)
            runs["jax"].append(np.asarray(p))
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt, runs["torch"] = torch_optimizer([param], **kw), []
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        runs["torch"].append(param.detach().numpy().copy())
    for name, steps in runs.items():
        for t, (got, want) in enumerate(zip(steps, expected), 1):
            assert got.dtype == dtype, name
            err = np.abs(got.astype(np.float64) - want)
            if dtype == np.float64:
                bound = 1e-12 * np.maximum(np.abs(want), 1.0)
            else:
                bound = 4 * t * np.spacing(np.maximum(np.abs(want), 1.0).astype(np.float32)).astype(np.float64)
            assert np.all(err <= bound), f"{name} step {t}: {np.max(err / bound):.1f}x the bound"
