"""Bad input to the PPO math gets a clear error in both backends; NaN behaviour is as documented
(NaN on padding is ignored in values and gradients; NaN on a real token propagates)."""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.backends import BACKENDS

B, T = 3, 5
MASK = (np.arange(T)[None] < np.array([5, 2, 1])[:, None]).astype(np.int32)


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request):
    return request.param


def _x(seed=0, shape=(B, T)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_mismatched_shapes(backend):
    with pytest.raises(ValueError,
                       match=r"policy_loss: old_logprobs has shape \(3, 4\), but logprobs has shape \(3, 5\)"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1, (B, 4)), _x(2), MASK)
    with pytest.raises(ValueError, match=r"value_loss: mask has shape"):
        backend.call_eager("value_loss", "losses", _x(), _x(1), _x(2), MASK[:, :4])
    with pytest.raises(ValueError, match=r"gae: values has shape"):
        backend.call_eager("gae", "advantages", _x(), _x(1, (B + 1, T)), MASK, gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match=r"shape_rewards: scores must have shape \(3,\)"):
        backend.call_eager("shape_rewards", "advantages", _x(0, (B + 1,)), _x(), _x(1), MASK, 0.1)


@pytest.mark.parametrize("bad", [2, -1])
def test_non_binary_mask(backend, bad):
    mask = MASK.copy()
    mask[1, 3] = bad
    with pytest.raises(ValueError, match=rf"mask must hold only 0/1, found {bad} at \(1, 3\)"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1), _x(2), mask)
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        backend.call_eager("whiten", "masked", _x(), mask)


def test_all_zero_mask(backend):
    zero = np.zeros((B, T), np.int32)
    for fn, module, args in [("policy_loss", "losses", (_x(), _x(1), _x(2), zero)),
                             ("value_loss", "losses", (_x(), _x(1), _x(2), zero)),
                             ("masked_mean", "masked", (_x(), zero)),
                             ("whiten", "masked", (_x(), zero)),
                             ("gae", "advantages", (_x(), _x(1), zero))]:
        kw = dict(gamma=1.0, lam=0.9) if fn == "gae" else {}
        with pytest.raises(ValueError, match=f"{fn}: mask is all zeros"):
            backend.call_eager(fn, module, *args, **kw)


def test_gae_rejects_holes_in_mask(backend):
    mask = MASK.copy()
    mask[0, 2] = 0
    with pytest.raises(ValueError, match=r"gae: the real tokens of each row must be one contiguous block; rows \[0\]"):
        backend.call_eager("gae", "advantages", _x(), _x(1), mask, gamma=1.0, lam=0.9)


def test_unbiased_variance_of_one_token(backend):
    one = np.zeros((B, T), np.int32)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="unbiased variance needs at least 2 real tokens"):
        backend.call_eager("masked_var", "masked", _x(), one, unbiased=True)


def test_invalid_options(backend):
    with pytest.raises(ValueError, match=r"policy_loss: kind='ppo' is invalid: allowed 'pg', 'is', 'clip'"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1), _x(2), MASK, kind="ppo")
    with pytest.raises(ValueError, match=r"loss_agg='mean' is invalid"):
        backend.call_eager("value_loss", "losses", _x(), _x(1), _x(2), MASK, loss_agg="mean")
    with pytest.raises(ValueError, match=r"dual_clip=0.5 is invalid: allowed > 1"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1), _x(2), MASK, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"kl_penalty: kind='k4' is invalid"):
        backend.call_eager("kl_penalty", "losses", _x(), _x(1), kind="k4")


def test_all_zero_mask_inside_jit_gives_zero(backend):
    """Documented: where mask values cannot be read (inside jax.jit), an all-zero mask gives 0."""
    if backend.name != "jax":
        pytest.skip("torch reads CPU masks eagerly")
    zero = np.zeros((B, T), np.int32)
    loss = backend.call("policy_loss", "losses", _x(), _x(1), _x(2), zero)[0]  # call() jits
    assert float(loss) == 0.0


def test_nan_on_padding_is_ignored_nan_on_real_token_propagates(backend):
    lp, old, adv = _x(), _x(1), _x(2)
    clean = backend.value_and_grad("policy_loss", "losses", 0, lp, old, adv, MASK)
    dirty = [a.copy() for a in (lp, old, adv)]
    for a in dirty:
        a[MASK == 0] = np.nan
    loss, grad, stats = backend.value_and_grad("policy_loss", "losses", 0, *dirty, MASK)
    assert float(loss) == float(clean[0])
    np.testing.assert_array_equal(grad, clean[1])
    assert all(np.isfinite(v) for v in stats.values())
    dirty[2][0, 0] = np.nan  # a real token
    loss, _, _ = backend.value_and_grad("policy_loss", "losses", 0, *dirty, MASK)
    assert np.isnan(loss)


# ---- critic-free math ---------------------------------------------------------------------------
def test_group_advantages_bad_groups(backend):
    scores = _x(0, (6,))
    with pytest.raises(ValueError, match=r"group_advantages: scores has 6 entries, not a positive multiple of "
                                         r"num_generations=4"):
        backend.call_eager("group_advantages", "advantages", scores, num_generations=4, kind="grpo")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"group_advantages: num_generations={bad!r} is invalid: allowed an "
                                             r"integer >= 1"):
            backend.call_eager("group_advantages", "advantages", scores, num_generations=bad, kind="grpo")
    with pytest.raises(ValueError, match=r"group_advantages: scores must be 1-D \[num_prompts \* num_generations\], "
                                         r"got shape \(2, 3\)"):
        backend.call_eager("group_advantages", "advantages", _x(0, (2, 3)), num_generations=3, kind="grpo")
    with pytest.raises(ValueError, match=r"group_advantages: kind='ppo' is invalid: allowed 'grpo', 'dr_grpo', "
                                         r"'rloo'"):
        backend.call_eager("group_advantages", "advantages", scores, num_generations=2, kind="ppo")
    with pytest.raises(ValueError, match=r"group_advantages: kind='rloo' needs num_generations >= 2"):
        backend.call_eager("group_advantages", "advantages", scores, num_generations=1, kind="rloo")


def test_reinforce_pp_bad_input(backend):
    with pytest.raises(ValueError, match=r"reinforce_pp_returns: mask has shape \(3, 4\), but rewards has shape"):
        backend.call_eager("reinforce_pp_returns", "advantages", _x(), MASK[:, :4], gamma=1.0)
    holes = MASK.copy()
    holes[0, 2] = 0
    with pytest.raises(ValueError, match=r"reinforce_pp_returns: the real tokens of each row must be one "
                                         r"contiguous block; rows \[0\]"):
        backend.call_eager("reinforce_pp_returns", "advantages", _x(), holes, gamma=1.0)
    with pytest.raises(ValueError, match="reinforce_pp_returns: mask is all zeros"):
        backend.call_eager("reinforce_pp_returns", "advantages", _x(), np.zeros((B, T), np.int32), gamma=1.0)
    with pytest.raises(ValueError, match=r"reinforce_pp_baseline: num_generations=1 leaves no score"):
        backend.call_eager("reinforce_pp_baseline", "advantages", _x(0, (B,)), _x(), _x(1), MASK, 0.1,
                           num_generations=1, gamma=1.0)
    with pytest.raises(ValueError, match=r"group_advantages: scores has 3 entries, not a positive multiple of "
                                         r"num_generations=2"):
        backend.call_eager("reinforce_pp_baseline", "advantages", _x(0, (B,)), _x(), _x(1), MASK, 0.1,
                           num_generations=2, gamma=1.0)


def test_aggregation_bad_input(backend):
    with pytest.raises(ValueError, match=r"aggregation_count: loss_agg='seq-sum' is invalid: allowed 'token-mean', "
                                         r"'seq-mean-token-mean', 'seq-mean-token-sum-norm'"):
        backend.call_eager("aggregation_count", "masked", MASK, loss_agg="seq-sum")
    with pytest.raises(ValueError, match=r"aggregation_count: mask must be 2-D \[batch, time\], got shape \(5,\)"):
        backend.call_eager("aggregation_count", "masked", MASK[0], loss_agg="token-mean")
    with pytest.raises(ValueError, match=r"aggregation_count: mask must hold only 0/1"):
        backend.call_eager("aggregation_count", "masked", MASK * 2, loss_agg="token-mean")


def test_sequence_ratio_and_kl_loss_bad_options(backend):
    with pytest.raises(ValueError, match=r"policy_loss: importance_level='seq' is invalid: allowed 'token', "
                                         r"'sequence'"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1), _x(2), MASK, importance_level="seq")
    with pytest.raises(ValueError, match=r"policy_loss: importance_level='sequence' needs a ratio: allowed with "
                                         r"kind 'is' or 'clip', not 'pg'"):
        backend.call_eager("policy_loss", "losses", _x(), _x(1), _x(2), MASK, kind="pg", importance_level="sequence")
    with pytest.raises(ValueError, match=r"kl_loss: kind='k2\+' is invalid: allowed 'k1', 'k2', 'k3', 'k1\+', "
                                         r"'k3\+'"):
        backend.call_eager("kl_loss", "losses", _x(), _x(1), kind="k2+")
    with pytest.raises(ValueError, match=r"kl_penalty: mask has shape"):
        backend.call_eager("kl_loss", "losses", _x(), _x(1), kind="k3+", mask=MASK[:, :4])


def test_nan_on_padding_is_ignored_at_sequence_level(backend):
    """The sequence ratio averages real tokens only: NaN padding changes neither loss nor gradient."""
    lp, old, adv = _x(), _x(1), _x(2)
    clean = backend.value_and_grad("policy_loss", "losses", 0, lp, old, adv, MASK, importance_level="sequence")
    dirty = [a.copy() for a in (lp, old, adv)]
    for a in dirty:
        a[MASK == 0] = np.nan
    loss, grad, _ = backend.value_and_grad("policy_loss", "losses", 0, *dirty, MASK, importance_level="sequence")
    assert float(loss) == float(clean[0])
    np.testing.assert_array_equal(grad, clean[1])
