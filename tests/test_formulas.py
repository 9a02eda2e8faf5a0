"""The math itself, checked against the seed's formulas in each backend (not backend vs backend).

- eq. 4.2 = eq. 4.1 at r = 1: at theta = theta_old the gradients of "is" and "clip" equal "pg".
- L_CLIP's gradient is zero exactly on the tokens whose ratio left the band in the direction
  their advantage pushes (A > 0, r > 1 + eps; A < 0, r < 1 - eps), and equals r * A elsewhere.
- eqs. 4.1/4.2 as estimators: on a bandit with a known objective J(theta) = sum_a pi(a) R(a), the
  sampled policy-gradient (samples from pi) and importance-sampled (samples from pi_old)
  gradients match the exact gradient within Monte-Carlo error.
- GAE with gamma = lam = 1 is reward-to-go minus value; lam = 0 is the one-step TD residual.
- Whitened advantages have masked mean 0 and variance 1.
- k1 and k3 are unbiased estimators of KL(p || q); k3 >= 0.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.backends import BACKENDS

B, T = 4, 9


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request):
    return request.param


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 4, 1, 6])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    logprobs = -rng.exponential(1.0, size=(B, T))
    return rng, mask, logprobs


@pytest.mark.parametrize("kind", ["is", "clip"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_is_and_clip_equal_pg_at_ratio_one(backend, kind, loss_agg):
    rng, mask, logprobs = _batch()
    adv = rng.normal(size=(B, T))
    _, g_pg, _ = backend.value_and_grad("policy_loss", "losses", 0, logprobs, logprobs, adv, mask,
                                        kind="pg", loss_agg=loss_agg)
    _, g, stats = backend.value_and_grad("policy_loss", "losses", 0, logprobs, logprobs, adv, mask,
                                         kind=kind, loss_agg=loss_agg)
    np.testing.assert_allclose(g, g_pg, rtol=1e-12, atol=1e-15)
    assert np.abs(g_pg[mask == 1]).min() > 0  # a real comparison, not zeros against zeros
    assert float(stats["clipfrac"]) == 0.0 and float(stats["ratio_mean"]) == 1.0


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.1, 0.3)])
def test_clip_gradient_zero_exactly_where_ratio_left_band_in_advantage_direction(backend, eps_low, eps_high):
    rng, mask, logprobs = _batch(1)
    # log-ratios spread over [-1, 1]: many tokens inside the band, many outside on both sides
    log_ratio = rng.uniform(-1.0, 1.0, size=(B, T))
    old = logprobs - log_ratio
    adv = rng.choice([-1.0, 1.0], size=(B, T)) * rng.uniform(0.5, 2.0, size=(B, T))
    _, g, stats = backend.value_and_grad("policy_loss", "losses", 0, logprobs, old, adv, mask,
                                         kind="clip", clip_eps=eps_low, clip_eps_high=eps_high)
    r = np.exp(log_ratio)
    left_band = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))
    real = mask == 1
    n_real = real.sum()
    assert (left_band & real).any() and (~left_band & real).any()
    np.testing.assert_array_equal(g[left_band & real], 0.0)
    # elsewhere: d(-r A)/d logprob = -r A, scaled by the token-mean weight 1/N
    np.testing.assert_allclose(g[~left_band & real], (-r * adv / n_real)[~left_band & real], rtol=1e-12)
    np.testing.assert_array_equal(g[~real], 0.0)
    assert np.isclose(float(stats["clipfrac"]), (left_band & real).sum() / n_real)


def test_dual_clip_bounds_negative_advantage_loss(backend):
    rng, mask, logprobs = _batch(2)
    old = logprobs - 3.0  # ratio e^3 ~ 20 everywhere
    adv = -np.ones((B, T))
    loss, g, stats = backend.value_and_grad("policy_loss", "losses", 0, logprobs, old, adv, mask,
                                            kind="clip", dual_clip=3.0)
    assert np.isclose(float(loss), 3.0)  # -c * A = 3 on every token
    np.testing.assert_array_equal(g, 0.0)
    assert float(stats["dual_clipfrac"]) == 1.0


def _bandit_grad(backend, kind, n_samples, seed):
    """Sampled surrogate gradient w.r.t. the logits of a 5-armed bandit policy, and the exact
    gradient of J = sum_a softmax(logits)_a R(a)."""
    rng = np.random.default_rng(seed)
    logits = np.array([0.3, -0.5, 1.0, 0.0, -1.2])
    old_logits = logits + np.array([0.2, -0.1, -0.3, 0.4, 0.0])
    rewards = np.array([1.0, -0.5, 0.3, 2.0, -1.0])
    pi = np.exp(logits) / np.exp(logits).sum()
    exact = pi * (rewards - pi @ rewards)  # d/dlogits sum_a pi_a R_a
    behaviour = pi if kind == "pg" else np.exp(old_logits) / np.exp(old_logits).sum()
    actions = rng.choice(5, size=n_samples, p=behaviour)
    old_lp = np.log(behaviour)[actions][None, :]
    mask = np.ones((1, n_samples), dtype=np.int32)
    adv = rewards[actions][None, :]

    # loss(logits) = policy_loss(log softmax(logits)[actions], ...); the mean over samples is the
    # 1/N sum of eqs. 4.1 / 4.2. Its gradient w.r.t. logits estimates -grad J.
    def surrogate_grad():
        import jax
        import jax.numpy as jnp
        import torch

        if backend.name == "jax":
            from ppo_jax.losses import logprobs_from_logits, policy_loss

            with jax.enable_x64(True):
                def f(lg):
                    lp = logprobs_from_logits(jnp.broadcast_to(lg, (1, n_samples, 5)), jnp.asarray(actions)[None])
                    return policy_loss(lp, jnp.asarray(old_lp), jnp.asarray(adv), jnp.asarray(mask), kind=kind)[0]
                return -np.asarray(jax.grad(f)(jnp.asarray(logits)))
        from ppo_torch.losses import logprobs_from_logits, policy_loss

        lg = torch.tensor(logits, requires_grad=True)
        lp = logprobs_from_logits(lg.expand(1, n_samples, 5), torch.from_numpy(actions)[None])
        old, a, m = (torch.from_numpy(x) for x in (old_lp, adv, mask))
        policy_loss(lp, old, a, m, kind=kind)[0].backward()
        return -lg.grad.numpy()

    return surrogate_grad(), exact


@pytest.mark.parametrize("kind", ["pg", "is"])
def test_sampled_gradients_estimate_the_exact_policy_gradient(backend, kind):
    n = 200_000
    est, exact = _bandit_grad(backend, kind, n, seed=3)
    # Each component is a mean of n iid terms of O(1) size: standard error ~ 2/sqrt(n) = 0.0045;
    # 5 standard errors. A wrong sign, a missing ratio or a missing grad-log-pi is off by >> this.
    np.testing.assert_allclose(est, exact, atol=5 * 2 / np.sqrt(n))
    assert np.abs(exact).max() > 0.1


def test_gae_gamma_lam_one_is_reward_to_go_minus_value(backend):
    from parity_tests.reference import reward_to_go

    rng, mask, _ = _batch(4)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    adv, ret = backend.call("gae", "advantages", rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, (reward_to_go(rewards, mask) - values) * mask, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret, reward_to_go(rewards, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lam_zero_is_one_step_td_residual(backend, gamma):
    rng, mask, _ = _batch(5)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    adv, _ = backend.call("gae", "advantages", rewards, values, mask, gamma=gamma, lam=0.0)
    next_v = np.pad(values[:, 1:] * mask[:, 1:], ((0, 0), (0, 1)))  # V after the last token = 0
    np.testing.assert_allclose(adv, (rewards + gamma * next_v - values) * mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_whitened_advantages_have_mean_zero_variance_one(backend, unbiased):
    rng, mask, _ = _batch(6)
    adv = rng.normal(3.0, 5.0, size=(B, T))
    w = backend.call("whiten", "masked", adv, mask, unbiased=unbiased)
    real = w[mask == 1]
    assert abs(real.mean()) < 1e-12
    assert abs(real.var(ddof=1 if unbiased else 0) - 1.0) < 1e-6  # eps=1e-8 in the denominator
    np.testing.assert_array_equal(w[mask == 0], 0.0)
    kept = backend.call("whiten", "masked", adv, mask, shift_mean=False, unbiased=unbiased)
    assert abs(kept[mask == 1].mean() - adv[mask == 1].mean()) < 1e-9


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased(backend, kind):
    rng = np.random.default_rng(7)
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.25, 0.25, 0.4, 0.1])
    true_kl = float((p * np.log(p / q)).sum())
    n = 200_000
    x = rng.choice(4, size=n, p=p)
    est = backend.call("kl_penalty", "losses", np.log(p)[x][None], np.log(q)[x][None], kind=kind)
    if kind == "k3":
        assert est.min() >= 0
    # per-sample std of both estimators here is < 0.7 -> standard error < 0.0016; 5 of them
    assert abs(est.mean() - true_kl) < 5 * 0.7 / np.sqrt(n)


def test_adaptive_kl_controller_moves_towards_target():
    from ppo_rlhf.kl_control import adaptive_kl_update

    up = adaptive_kl_update(0.1, 12.0, 100, target=6.0, horizon=1000)
    down = adaptive_kl_update(0.1, 1.0, 100, target=6.0, horizon=1000)
    same = adaptive_kl_update(0.1, 6.0, 100, target=6.0, horizon=1000)
    # error clipped to +-0.2: beta * (1 +- 0.2 * 100 / 1000)
    assert np.isclose(up, 0.1 * 1.02) and np.isclose(down, 0.1 * 0.98) and np.isclose(same, 0.1)
