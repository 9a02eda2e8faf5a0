"""Which KL estimators, put in the LOSS, have the gradient of KL(pi || pi_ref)? Proved exactly on
small categorical policies, in both cores, through their autodiff of `kl_loss`.

A loss term k(x) on tokens x sampled from pi contributes, in expectation, E_{x~pi}[grad k(x)]: the
gradient of k evaluated at the samples, NOT differentiating through the sampling distribution (the
samples are data). With V outcomes that expectation is a finite sum, sum_x pi(x) grad k(x) with
pi(x) held constant, so it is computed exactly by enumeration -- no Monte-Carlo error -- and
compared with gradients known in closed form. With d = log pi - log pi_ref and
grad log pi(x) = e_x - pi (softmax logits z):
  grad_z KL(pi || pi_ref) = pi * (d - KL(pi || pi_ref))
  grad_z KL(pi_ref || pi) = pi - pi_ref
Findings (asserted below): k2's expected gradient E[d grad log pi] is exactly grad KL(pi || pi_ref),
and so are the straight-through "k1+" and "k3+" (k2's gradient); k1's is exactly 0
(E[grad log pi] = 0), whatever pi is; k3's, E[(1 - pi_ref / pi) grad log pi] = -E_{pi_ref}[grad log pi],
is exactly grad KL(pi_ref || pi), the other direction.

Tolerances: float64 enumeration over 5 (or 25) terms of size O(1) rounds at ~1e-16 each, so the
sums agree to 1e-12 (atol) with room; "differs" assertions use gradients whose difference is at
least 1e-2 on these seeds (checked in the test, so the inequalities mean something).

Over sequences (the second test) the per-token estimator meets a second bias: the token-level
k2 term has the gradient of the per-step KLs with the visited states held fixed, missing the
effect of early tokens on later KL; k1 put in the REWARD and summed to go (reward-to-go of
`shape_rewards`, as PPO and REINFORCE++ do) gives the exact gradient of the sequence KL.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppo_jax.advantages as jadv
import ppo_jax.losses as jl
import ppo_torch.advantages as tadv
import ppo_torch.losses as tl

V = 5
ATOL = 1e-12
EXACT = ("k2", "k1+", "k3+")  # expected gradient = grad KL(pi || pi_ref)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def expected_grad(backend: str, z: np.ndarray, z_ref: np.ndarray, kind: str) -> np.ndarray:
    """sum_x sg(pi(x)) * grad_z kl_loss(log pi_z(x), log pi_ref(x)) by the core's autodiff: every
    outcome x as one token of a [1, V] batch, weighted by its probability held constant."""
    logq = z_ref - np.log(np.exp(z_ref).sum())
    if backend == "jax":
        with jax.enable_x64(True):
            def loss(z):
                logp = jax.nn.log_softmax(z)
                weights = jax.lax.stop_gradient(jnp.exp(logp))
                return jnp.sum(weights * jl.kl_loss(logp[None], jnp.asarray(logq)[None], kind)[0])
            return np.asarray(jax.grad(loss)(jnp.asarray(z)))
    zt = torch.tensor(z, requires_grad=True)
    logp = torch.log_softmax(zt, -1)
    loss = (torch.exp(logp).detach() * tl.kl_loss(logp[None], torch.tensor(logq)[None], kind)[0]).sum()
    (g,) = torch.autograd.grad(loss, zt)
    return g.numpy()


def exact_grads(z: np.ndarray, z_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grad_z KL(pi || pi_ref), grad_z KL(pi_ref || pi)) in closed form."""
    p, q = _softmax(z), _softmax(z_ref)
    d = np.log(p) - np.log(q)
    return p * (d - np.sum(p * d)), p - q


def _cases():
    rng = np.random.default_rng(0)
    out = [(rng.normal(size=V) * s, rng.normal(size=V) * s) for s in (0.5, 1.0, 2.0)]
    z = rng.normal(size=V)
    out.append((z, z + 1e-3 * rng.normal(size=V)))  # pi close to pi_ref
    return out


CASES = _cases()


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k1+", "k3+"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_expected_gradient_of_each_estimator(backend, kind, case):
    z, z_ref = CASES[case]
    got = expected_grad(backend, z, z_ref, kind)
    forward, reverse = exact_grads(z, z_ref)
    want = {"k1": np.zeros(V), "k3": reverse}.get(kind, forward)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{backend} {kind}")
    if kind in EXACT or case == len(CASES) - 1:
        return  # near pi_ref every gradient is ~0 and the directions agree to second order
    # the biased ones really differ from grad KL(pi || pi_ref) (not only within the tolerance)
    assert np.abs(got - forward).max() > 1e-2, f"{backend} {kind}: expected a visibly biased gradient"


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_monte_carlo_mean_converges_to_the_enumerated_gradient(backend, kind):
    """The gradient of the loss on N sampled tokens, sum_n grad k(x_n) / N, the quantity a trainer
    computes, is within 5 standard errors of the enumerated expectation (N = 20000; the standard
    error from the per-sample gradients c_k(x) (e_x - pi), c = dk/dlog pi, in closed form)."""
    z, z_ref = CASES[1]
    p, q = _softmax(z), _softmax(z_ref)
    x = np.random.default_rng(1).choice(V, size=20000, p=p)
    logq = np.log(q)
    if backend == "jax":
        with jax.enable_x64(True):
            def loss(z):
                logp = jax.nn.log_softmax(z)[x]
                return jnp.mean(jl.kl_loss(logp[None], jnp.asarray(logq[x])[None], kind))
            mc = np.asarray(jax.grad(loss)(jnp.asarray(z)))
    else:
        zt = torch.tensor(z, requires_grad=True)
        logp = torch.log_softmax(zt, -1)[torch.from_numpy(x)]
        (g,) = torch.autograd.grad(tl.kl_loss(logp[None], torch.tensor(logq[x])[None], kind).mean(), zt)
        mc = g.numpy()
    d = np.log(p[x]) - logq[x]
    c = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}[kind]
    per_sample = c[:, None] * (np.eye(V)[x] - p)
    np.testing.assert_allclose(mc, per_sample.mean(0), rtol=1e-10, atol=1e-12)  # autodiff = closed form
    stderr = per_sample.std(0) / np.sqrt(len(x))
    assert np.all(np.abs(mc - expected_grad(backend, z, z_ref, kind)) <= 5 * stderr + 1e-12), backend


# ---- sequences: two tokens, the second's distribution depends on the first --------------------
def _two_step_logprobs(lib, z1, z2):
    """log pi(a1) and log pi(a2 | a1) for all V*V sequences (a1 major), as [V*V, 2]."""
    if lib == "jax":
        l1, l2 = jax.nn.log_softmax(z1), jax.nn.log_softmax(z2, axis=-1)
        return jnp.stack([jnp.repeat(l1, V), l2.reshape(-1)], axis=1)
    l1, l2 = torch.log_softmax(z1, -1), torch.log_softmax(z2, -1)
    return torch.stack([l1.repeat_interleave(V), l2.reshape(-1)], dim=1)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_per_token_k2_in_the_loss_is_biased_for_the_sequence_kl_k1_in_the_reward_is_not(backend):
    """Sequences of 2 tokens from a tabular policy (logits z1 [V] for a1, z2 [V, V] for a2 | a1),
    enumerated (25 sequences). grad of the sequence KL(pi || pi_ref) = E[sum_t d_t] by autodiff of
    the exact sum, against:
    - k2 per token in the loss, E[sum_t grad k2_t]: exact for z2 (the last step) but not for z1 --
      it misses E[grad log pi(a1) * d_2], how the first token changes the second's KL;
    - k1 in the reward (`shape_rewards` with score 0, kl_coef 1), summed to go
      (`reinforce_pp_returns`' returns G_t = -sum_{t' >= t} d_t') in a policy-gradient loss
      (`policy_loss(kind="pg")`): exact for both."""
    rng = np.random.default_rng(3)
    z1, z2, r1, r2 = rng.normal(size=V), rng.normal(size=(V, V)), rng.normal(size=V), rng.normal(size=(V, V))
    mask = np.ones((V * V, 2), np.int32)
    n_cells = mask.size  # the pg loss is aggregated with sum / (B * T) (seq-mean-token-sum-norm)

    if backend == "jax":
        lib, adv_mod, loss_mod, sg, exp, arr = "jax", jadv, jl, jax.lax.stop_gradient, jnp.exp, jnp.asarray
        ctx = jax.enable_x64(True)
    else:
        lib, adv_mod, loss_mod, sg, exp, arr = "torch", tadv, tl, torch.Tensor.detach, torch.exp, torch.tensor
        ctx = contextlib.nullcontext()
    with ctx:
        ref_lp = _two_step_logprobs(lib, arr(r1), arr(r2))
        zero_scores = arr(np.zeros(V * V))

        def exact_kl(z1, z2):  # sum over sequences of pi(seq) * sum_t d_t
            lp = _two_step_logprobs(lib, z1, z2)
            return (exp(lp.sum(1)) * (lp - ref_lp).sum(1)).sum()

        def k2_loss(z1, z2):
            lp = _two_step_logprobs(lib, z1, z2)
            return (exp(sg(lp).sum(1)) * loss_mod.kl_loss(lp, ref_lp, "k2").sum(1)).sum()

        def k1_reward_loss(z1, z2):
            lp = _two_step_logprobs(lib, z1, z2)
            w = exp(sg(lp).sum(1))
            rewards, _ = adv_mod.shape_rewards(zero_scores, sg(lp), ref_lp, arr(mask), 1.0, kl_estimator="k1")
            _, returns = adv_mod.reinforce_pp_returns(rewards, arr(mask), gamma=1.0)
            # sum_b w_b sum_t log pi_bt * (-G_bt), as the pg loss's sum / (B * T) of -log pi * A
            loss, _ = loss_mod.policy_loss(lp, sg(lp), returns * w[:, None] * n_cells, arr(mask), kind="pg",
                                           loss_agg="seq-mean-token-sum-norm")
            return loss

        def grads(f):
            if lib == "jax":
                return [np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(arr(z1), arr(z2))]
            a, b = torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)
            return [g.numpy() for g in torch.autograd.grad(f(a, b), (a, b))]

        want1, want2 = grads(exact_kl)
        k2_1, k2_2 = grads(k2_loss)
        rw_1, rw_2 = grads(k1_reward_loss)
    np.testing.assert_allclose(rw_1, want1, rtol=0, atol=ATOL, err_msg="k1 in the reward, first token")
    np.testing.assert_allclose(rw_2, want2, rtol=0, atol=ATOL, err_msg="k1 in the reward, second token")
    np.testing.assert_allclose(k2_2, want2, rtol=0, atol=ATOL, err_msg="k2 in the loss, last token")
    assert np.abs(k2_1 - want1).max() > 1e-2, "k2 in the loss was expected to miss the first token's effect"
