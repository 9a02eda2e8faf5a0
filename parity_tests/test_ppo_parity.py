"""Full-step parity: the JAX and PyTorch trainers, started from the same checkpoint and fed the
same prompts and the same Gumbel noise, must produce identical rollouts, the same stats and the
same updated weights -- for one PPO iteration and for three in a row.

Tolerances (float32 throughout), measured and explained:
- Iteration 0 (identical weights): the two backends' matmuls round differently (~1e-7 relative
  per op), so log-probs, values and scores agree to ~1.5e-6 and stats to ~1e-5 relative.
- Updated weights: AdamW divides each gradient by sqrt(v_hat) + eps, so a rounding difference of
  a gradient component enters the update as lr * (its relative error); small components have
  relative errors ~1e-3, hence |w_jax - w_torch| ~ 1e-6 after an iteration at lr=1e-3, while the
  weights MOVE by ~4e-3 (2 epochs x 2 minibatches): the updates agree to ~3e-4 of their size.
  Checked at 5e-6 absolute per iteration (3 iterations: 1.5e-5).
- Iterations 1 and 2 run on those slightly different weights, so their outputs inherit the
  difference: ~1e-5 on log-probs and values; checked at 5e-5 absolute / 1e-4 relative.
The sampled tokens must be IDENTICAL every iteration.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import PPOConfig
from ppo_rlhf.noise import gumbel_noise
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

B, P, N = 4, 6, 8

BASE = dict(batch_size=B, max_prompt_len=P, max_new_tokens=N, learning_rate=1e-3, temperature=0.9,
            ppo_epochs=2, num_minibatches=2)

CONFIGS = {
    "default": dict(),
    "accum-adaptive-kl-k3": dict(grad_accum_steps=2, adaptive_kl=True, kl_target=0.5, kl_horizon=100,
                                 kl_estimator="k3", kl_units="token-mean"),
    "seq-mean-whiten-rewards-dual-clip": dict(loss_agg="seq-mean-token-mean", whiten_rewards=True,
                                              dual_clip=3.0, clip_eps_high=0.28, whiten_unbiased=True,
                                              advantages_shift_mean=False, ent_coef=0.01,
                                              missing_eos_penalty=1.0, gamma=0.95, lam=0.9),
    "pg-unclipped-value": dict(policy_loss="pg", value_clip_eps=None, num_minibatches=1,
                               max_grad_norm=None, weight_decay=0.01),
}


def _reward_fn(prompts, responses):
    """A host-side reward: longer responses with more distinct characters score higher."""
    return [0.1 * len(set(r)) - 0.02 * len(r) for r in responses]


def _trainers(ckpt, config, *, reward="fn", shared=False):
    import ppo_jax.ppo as jp
    import ppo_torch.ppo as tp
    from ppo_jax.models import load_pretrained as jload
    from ppo_torch.models import load_pretrained as tload

    kw = dict(config=config, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    rw_j = rw_t = _reward_fn if reward == "fn" else reward
    pol_j = jload(ckpt, with_value_head=True, seed=3) if shared else str(ckpt)
    pol_t = tload(ckpt, with_value_head=True, seed=3) if shared else str(ckpt)
    return jp.PPOTrainer(pol_j, rw_j, **kw), tp.PPOTrainer(pol_t, rw_t, device="cpu", **kw)


def _weights(trainer):
    if trainer.backend == "jax":
        from ppo_jax.models import model_tensors
    else:
        from ppo_torch.models import model_tensors
    out = {f"policy.{k}": v for k, v in model_tensors(trainer.policy_model()).items()}
    if not trainer.shared_trunk:
        out.update({f"critic.{k}": v for k, v in model_tensors(trainer.critic_model()).items()})
    return out


TIGHT = dict(rtol=1e-5, atol=2e-6)        # iteration 0: same weights
PROPAGATED = dict(rtol=1e-4, atol=5e-5)   # later iterations: weights differ by ~1e-6 (see top)


def _compare_rollouts(rj, rt, tol):
    np.testing.assert_array_equal(rj.response_ids, rt.response_ids, err_msg="sampled tokens differ")
    np.testing.assert_array_equal(rj.response_mask, rt.response_mask)
    for k in ("logprobs", "ref_logprobs", "values", "scores"):
        np.testing.assert_allclose(getattr(rj, k), getattr(rt, k), err_msg=k, **tol)


def _compare_stats(sj, st, tol):
    assert set(sj) == set(st), set(sj) ^ set(st)
    for k in sj:
        if k.startswith("time/"):
            continue
        np.testing.assert_allclose(sj[k], st[k], err_msg=k, **tol)


def _compare_weights(tj, tt, atol):
    wj, wt = _weights(tj), _weights(tt)
    assert set(wj) == set(wt)
    worst = max(float(np.abs(wj[k].astype(np.float64) - wt[k]).max()) for k in wj)
    assert worst < atol, f"updated weights differ by {worst:.2e}"


def _inputs(vocab, iteration):
    q, qm, _, _ = make_padded_batch(100 + iteration, B, P, 1, vocab_size=vocab)
    return q, qm, gumbel_noise(1000 + iteration, B, N, vocab)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_iteration_then_three(tiny_checkpoint, name):
    ckpt = tiny_checkpoint("gpt2")
    config = PPOConfig(**{**BASE, **CONFIGS[name]})
    tj, tt = _trainers(ckpt, config)
    _compare_weights(tj, tt, atol=1e-7)  # same start (loaded from the same files)
    vocab = tj.policy_model().config.vocab_size
    moved = 0.0
    start = _weights(tj)
    for it in range(3):
        q, qm, noise = _inputs(vocab, it)
        rj = tj.rollout(q, qm, iteration=it, noise=noise)
        rt = tt.rollout(q, qm, iteration=it, noise=noise)
        tol = TIGHT if it == 0 else PROPAGATED
        _compare_rollouts(rj, rt, tol)
        sj = tj.step(it, query_ids=q, query_mask=qm, noise=noise)
        st = tt.step(it, query_ids=q, query_mask=qm, noise=noise)
        _compare_stats(sj, st, {**tol, "rtol": 2 * tol["rtol"]})
        _compare_weights(tj, tt, atol=5e-6 * (it + 1))
        if it == 0:
            end = _weights(tj)
            moved = max(float(np.abs(end[k] - start[k]).max()) for k in start)
    assert moved > 1e-4, "the update did not move the weights: the comparison would be vacuous"
    assert tj.kl_ctl.value == pytest.approx(tt.kl_ctl.value, rel=1e-6)


def test_shared_trunk_and_reward_model(tiny_checkpoint):
    """A policy with a value head on its trunk, scored by a learned reward model on device."""
    ckpt = tiny_checkpoint("llama")
    rm = tiny_checkpoint("llama", kind="scalar", seed=7, reward_gain=2.0, reward_bias=-0.5)
    config = PPOConfig(**BASE)
    tj, tt = _trainers(ckpt, config, reward=str(rm), shared=True)
    assert tj.shared_trunk and tt.shared_trunk and tj.native_reward is not None
    vocab = tj.policy_model().config.vocab_size
    for it in range(2):
        q, qm, noise = _inputs(vocab, it)
        sj = tj.step(it, query_ids=q, query_mask=qm, noise=noise)
        st = tt.step(it, query_ids=q, query_mask=qm, noise=noise)
        _compare_stats(sj, st, TIGHT if it == 0 else PROPAGATED)
        _compare_weights(tj, tt, atol=5e-6 * (it + 1))
