"""Full-step parity: the JAX and PyTorch trainers, started from the same checkpoint and fed the
same prompts and the same Gumbel noise, must produce identical rollouts, the same stats and the
same updated weights -- for one PPO iteration and for three in a row (two for the critic-free
estimators: `ITERATIONS`). Each test runs both
backends in float64 AND in float32 (four trainers) and compares them together. The inputs make
EOS really happen (`parity_tests/ppo_inputs.py`): every iteration has responses that stop early
and responses that do not (0 < eos_frac < 1 is asserted). The independent reference of a whole
iteration is `test_ppo_reference.py`.

Tolerances, measured and explained:
- The sampled tokens must be IDENTICAL every iteration, in all four runs.
- float64: both backends do the same arithmetic up to summation order, ~1e-16 per op; rollouts,
  stats and every updated weight agree to ~1e-15 (checked at 1e-11, 1e-10 in later iterations).
- float32, the first rollout (identical weights, one forward pass): matmuls round differently
  (~1e-7 relative per op), so log-probs, values and scores agree to ~1.5e-6 (checked at 1e-5
  relative, 2e-6 absolute) -- a fixed bound is right here: one pass, no amplification.
- float32, everything after an optimiser step (the update's stats, the updated weights, the
  later iterations' rollouts and stats): no fixed tolerance. Each value of each float32 run is
  compared to its float64 twin, and the two float32 runs may differ by no more than those two
  rounding errors together (`ppo_inputs.explained_by_rounding`): AdamW amplifies rounding by
  amounts that depend on the CPU's kernels and the libraries' versions (an entry whose gradient
  passes near 0; a variance of ratios averaged over several steps on drifting weights), and the
  bound follows. A float32 error that only one backend makes is caught by
  `ppo_inputs.accuracy_balance` (pooled errors of one size) instead.
The float32 checks of an iteration run before its float64 checks, so a bug present in both
precisions (`tools/mutants.py`) fails on the float32 rule first: evidence that the rule still
sees it.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.ppo_inputs import (
    ROLLOUT_KEYS,
    TOL,
    B,
    N,
    P,
    accuracy_balance,
    compare_arrays,
    compare_stats,
    compare_weights,
    explained_by_rounding,
    explained_stats,
    explained_weights,
    inputs,
    rounding_error,
    same_tokens,
    twins_within_rounding,
    weights,
    x64_if,
)
from ppo_rlhf import PPOConfig
from ppo_rlhf.testing import EOS_ID, PAD_ID

BASE = dict(batch_size=B, max_prompt_len=P, max_new_tokens=N, learning_rate=1e-3, temperature=0.9,
            ppo_epochs=2, num_minibatches=2)

CONFIGS = {
    "default": dict(),
    "accum-adaptive-kl-k3": dict(grad_accum_steps=2, adaptive_kl=True, kl_target=0.5, kl_horizon=100,
                                 kl_estimator="k3", kl_units="token-mean", missing_eos_penalty=0.5),
    "seq-mean-whiten-rewards-dual-clip": dict(loss_agg="seq-mean-token-mean", whiten_rewards=True,
                                              dual_clip=3.0, clip_eps_high=0.28, whiten_unbiased=True,
                                              advantages_shift_mean=False, ent_coef=0.01,
                                              missing_eos_penalty=1.0, gamma=0.95, lam=0.9,
                                              grad_accum_steps=2),
    # critic-free estimators: groups of G responses per prompt, no critic
    "grpo-kl-loss-sequence": dict(advantage_estimator="grpo", num_generations=2, kl_coef=0.0,
                                  kl_loss_coef=0.1, importance_level="sequence",
                                  loss_agg="seq-mean-token-mean"),
    "dr-grpo-sum-norm-k3plus": dict(advantage_estimator="dr_grpo", num_generations=2, grad_accum_steps=2,
                                    loss_agg="seq-mean-token-sum-norm", kl_loss_coef=0.05,
                                    kl_loss_estimator="k3+"),
    "rloo": dict(advantage_estimator="rloo", num_generations=3, num_minibatches=3),
    "reinforce-pp": dict(advantage_estimator="reinforce_pp", gamma=0.9),
    "reinforce-pp-baseline": dict(advantage_estimator="reinforce_pp_baseline", num_generations=2,
                                  missing_eos_penalty=0.5),
    "pg-unclipped-value": dict(policy_loss="pg", value_clip_eps=None, num_minibatches=1,
                               max_grad_norm=None, weight_decay=0.01),
    # LoRA (peft in torch, ours in JAX) on policy and critic: their adapters (and the critic's
    # head) trained, the reference the policy with its adapters off
    "lora-policy-critic": dict(lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v", "o", "up"),
                               lora_roles=("policy", "critic"), learning_rate=1e-2),
}
ITERATIONS = {"lora-policy-critic": 2}  # (CI time) the others: 3


def _reward_fn(prompts, responses):
    """A host-side reward: longer responses with more distinct characters score higher."""
    return [0.1 * len(set(r)) - 0.02 * len(r) for r in responses]


def _trainers(ckpt, config, dtype, *, reward="fn", shared=False):
    import ppo_jax.ppo as jp
    import ppo_torch.ppo as tp
    from ppo_jax.models import load_pretrained as jload
    from ppo_torch.models import load_pretrained as tload

    kw = dict(config=config, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype=dtype)
    rw = _reward_fn if reward == "fn" else reward
    with x64_if(dtype):
        pol_j = jload(ckpt, dtype, with_value_head=True, seed=3) if shared else str(ckpt)
        tj = jp.PPOTrainer(pol_j, rw, **kw)
    pol_t = tload(ckpt, dtype, with_value_head=True, seed=3) if shared else str(ckpt)
    return tj, tp.PPOTrainer(pol_t, rw, device="cpu", **kw)


def _iteration(tj, tt, dtype, it, q, qm, noise, *, check_rollouts: bool) -> dict:
    """One iteration in both trainers of one precision: {"r": rollouts, "s": stats, "w": weights},
    each a (jax, torch) pair."""
    G = tj.config.num_generations
    qr, qmr = np.repeat(q, G, axis=0), np.repeat(qm, G, axis=0)  # the rollout's rows: G per prompt
    with x64_if(dtype):
        rj = tj.rollout(qr, qmr, iteration=it, noise=noise).arrays() if check_rollouts else None
        sj = tj.step(it, query_ids=q, query_mask=qm, noise=noise)
        wj = weights(tj)
    rt = tt.rollout(qr, qmr, iteration=it, noise=noise).arrays() if check_rollouts else None
    st = tt.step(it, query_ids=q, query_mask=qm, noise=noise)
    return {"r": (rj, rt), "s": (sj, st), "w": (wj, weights(tt))}


def _run(runs: dict, iterations: int, *, check_rollouts: bool = True, exact_f64: bool = True) -> float:
    """Run `iterations` iterations in the four trainers (`runs`: dtype -> (jax, torch)),
    comparing everything after each; returns how far the float64 weights moved. exact_f64=False:
    the float64 runs are not float64 throughout (see test_shared_trunk_and_reward_model)."""
    starts = {}
    for dtype, (tj, _) in runs.items():
        with x64_if(dtype):
            starts[dtype] = weights(tj)
        assert {v.dtype for v in starts[dtype].values()} == {np.dtype(dtype)}
    vocab = runs["float64"][0].policy_model().config.vocab_size
    G = runs["float64"][0].config.num_generations
    moved = 0.0
    err = {"jax": ([], []), "torch": ([], [])}  # float32 and float64 log-probs/values, later iterations
    for it in range(iterations):
        q, qm, noise = inputs(vocab, it, G)
        out = {dtype: _iteration(*runs[dtype], dtype, it, q, qm, noise, check_rollouts=check_rollouts)
               for dtype in runs}
        o32, o64 = out["float32"], out["float64"]
        stage = "start" if it == 0 else "later"
        for s in (*o32["s"], *o64["s"]):
            assert 0 < s["gen/eos_frac"] < 1, "the inputs must make some responses stop at EOS"
            assert set(s) == set(o64["s"][0]), set(s) ^ set(o64["s"][0])
        # float32 (see the module docstring for why it goes first)
        if check_rollouts:
            same_tokens(*o32["r"], *o64["r"])
            (rj, rt), (Rj, Rt) = o32["r"], o64["r"]
            if it == 0:
                compare_arrays({k: rj[k] for k in ROLLOUT_KEYS}, rt, "float32", "start", "rollout")
            else:
                for k in ROLLOUT_KEYS:
                    explained_by_rounding(rj[k], rt[k], Rj[k], Rt[k], **TOL[("float64", stage)],
                                          what=f"iteration {it} rollout {k}")
                mask = Rt["response_mask"].astype(bool)
                for name, r32, r64 in (("jax", rj, Rj), ("torch", rt, Rt)):
                    err[name][0].extend(np.asarray(r32[k])[mask] for k in ("logprobs", "values"))
                    err[name][1].extend(np.asarray(r64[k])[mask] for k in ("logprobs", "values"))
        if not exact_f64:
            twins_within_rounding(*o32["w"], *o64["w"], what=f"iteration {it} weights")
            moved = max(float(np.abs(o64["w"][1][k] - starts["float64"][k]).max()) for k in o64["w"][1])
            continue
        explained_stats(*o32["s"], *o64["s"], stage, what=f"iteration {it}")
        explained_weights(*o32["w"], *o64["w"], what=f"iteration {it}")
        # float64
        if check_rollouts:
            compare_arrays({k: o64["r"][0][k] for k in ROLLOUT_KEYS}, o64["r"][1], "float64", stage, "rollout")
        compare_stats(*o64["s"], "float64", stage, what=f"iteration {it}")
        moved = compare_weights(*o64["w"], starts["float64"])
    if err["jax"][0]:
        accuracy_balance(rounding_error(*err["jax"]), rounding_error(*err["torch"]),
                         what="later rollouts' log-probs and values (jax vs torch)")
    assert moved > 1e-4, "the update did not move the weights: the comparison would be vacuous"
    return moved


# the critic-free configs run two iterations, not three: the second already runs on updated
# weights (its rollouts, their group statistics and the next update are checked as the third's
# would be), and the third added CI time, not a new code path
ITERATIONS = {name: 2 for name, c in CONFIGS.items() if c.get("advantage_estimator")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_iteration_then_three(tiny_checkpoint, name):
    ckpt = tiny_checkpoint("gpt2")
    config = PPOConfig(**{**BASE, **CONFIGS[name]})
    runs = {dtype: _trainers(ckpt, config, dtype) for dtype in ("float64", "float32")}
    for dtype, (tj, tt) in runs.items():
        with x64_if(dtype):
            wj = weights(tj)
        wt = weights(tt)
        assert set(wj) == set(wt) and all(np.array_equal(wj[k], wt[k]) for k in wj)  # same start
    _run(runs, ITERATIONS.get(name, 3))
    for tj, tt in runs.values():
        assert tj.kl_ctl.value == tt.kl_ctl.value  # the same host-side float64 controller


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_trunk_and_reward_model(tiny_checkpoint, arch):
    """A policy with a value head on its trunk, scored by a learned reward model on device.
    A Llama-family float64 run is not float64 throughout in transformers (its RMSNorm and rotary
    tables compute in float32 even for float64 weights; XLA's and torch's float32 cos differ by an
    ulp): its float64 twins are compared with `ppo_inputs.twins_within_rounding` instead."""
    ckpt = tiny_checkpoint(arch)
    rm = tiny_checkpoint(arch, kind="scalar", seed=7, reward_gain=2.0, reward_bias=-0.5)
    runs = {dtype: _trainers(ckpt, PPOConfig(**BASE, missing_eos_penalty=1.0), dtype, reward=str(rm),
                             shared=True) for dtype in ("float64", "float32")}
    for tj, tt in runs.values():
        assert tj.shared_trunk and tt.shared_trunk and tj.reward_model() is not None
    _run(runs, 2, check_rollouts=False, exact_f64=arch == "gpt2")
