"""Both trainers against an independent reference of one whole PPO iteration
(`parity_tests/reference_ppo.py`: plain torch + transformers, written apart from the library).

Same checkpoints, prompts, sampling noise (with EOS sampled in some rows, see ppo_inputs.py) and
minibatch order go into the reference and into each trainer; the sampled tokens must be
identical and the log-probs, values, scores, statistics and updated weights of policy and critic
must agree -- in float64 to ~1e-15 (checked at 1e-11); in float32 the rollout within the
full-step parity's forward-pass tolerance and everything after the update within the float32
rounding of each run against its float64 twin (`test_ppo_parity.py` explains both). Each
test runs all three in both precisions. A bug in code both backends share (ppo_rlhf),
or the same bug in both, fails here although it passes the JAX-vs-torch parity.

Settings: (a) a reward function, a critic from the policy's backbone with a seeded head, a
separate reference model (so the KL penalty is not 0 at iteration 0), token-mean losses, 2
micro-batches per minibatch, a missing-EOS penalty; (b) a normalised reward model (gain 5, bias
-15) scored on device, the critic initialised from it on its scale, seq-mean-token-mean losses;
(c) LoRA on policy and critic (`reward-fn-lora`): both start from the same nonzero adapters (B
too, so the policy is not its base and the KL penalty is in play from the first rollout), the
reference is the policy with its adapters off, and the reference computes the adapted
projections, the base log-probs and the adapters-only update by hand; the base weights must not
move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity_tests import reference_ppo
from parity_tests.ppo_inputs import (
    ROLLOUT_KEYS,
    B,
    N,
    P,
    compare_arrays,
    compare_stats,
    compare_weights,
    explained_stats,
    explained_weights,
    inputs,
    same_tokens,
    weights,
    x64_if,
)
from ppo_rlhf import PPOConfig
from ppo_rlhf.hf_checkpoint import init_score_head
from ppo_rlhf.runtime import seeds
from ppo_rlhf.testing import EOS_ID, PAD_ID

SETTINGS = {
    "reward-fn": dict(grad_accum_steps=2, missing_eos_penalty=1.0, kl_coef=0.2),
    "reward-fn-sum-norm": dict(grad_accum_steps=2, loss_agg="seq-mean-token-sum-norm", kl_coef=0.1),
    "reward-fn-grpo": dict(advantage_estimator="grpo", num_generations=2, kl_coef=0.05, kl_loss_coef=0.1,
                           missing_eos_penalty=1.0),
    "reward-model": dict(loss_agg="seq-mean-token-mean", missing_eos_penalty=0.5, gamma=0.95, lam=0.9,
                         weight_decay=0.01),
}
LORA = dict(lora_rank=2, lora_alpha=6.0, lora_targets=("q", "v", "o", "up"), lora_roles=("policy", "critic"))
SETTINGS["reward-fn-lora"] = dict(grad_accum_steps=2, missing_eos_penalty=1.0, kl_coef=0.2, **LORA)
STATS = ("loss/policy_avg", "loss/value_avg", "policy/entropy_avg", "policy/clipfrac_avg",
         "policy/approxkl_avg", "val/clipfrac_avg", "val/ratio", "policy/grad_norm_avg",
         "objective/kl", "objective/scores", "objective/entropy", "val/returns_mean",
         "gen/eos_frac", "gen/response_len_mean")


def _reward_fn(prompts, responses):
    return [0.1 * len(set(r)) - 0.02 * len(r) + 0.05 * len(p) for p, r in zip(prompts, responses)]


def start_adapters(ckpt, cfg, tmp_path) -> dict:
    """Nonzero adapters for the LoRA roles of `cfg`: role -> (PEFT adapter dir, {module: (A [r, in],
    B [out, r])}). A ~ U(-0.3, 0.3) and B ~ N(0, 0.3) at random (scaled by alpha / r = 3 in the
    forward: the adapted models differ from their base by far more than rounding)."""
    import ppo_jax.models as jm
    from ppo_jax.models import lora as jl
    from ppo_rlhf import lora as lr

    out = {}
    for i, role in enumerate(cfg.lora_roles):
        options = cfg.model_options(role)
        model = (jm.load_pretrained(ckpt, options=options) if role == "policy"
                 else jm.scalar_model_from_lm(ckpt, seed=cfg.seed, options=options))
        rng = np.random.default_rng(20 + i)
        tensors = {k: (rng.uniform(-0.3, 0.3, v.shape) if ".lora_A." in k else rng.normal(0, 0.3, v.shape))
                   .astype(np.float32) for k, v in jl.adapter_tensors(model).items()}
        path = lr.write_adapter(tmp_path / role, lr.peft_config(
            model_type="gpt2", rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0,
            modules=lr.lora_modules("gpt2", cfg.lora_targets),
            task_type="CAUSAL_LM" if role == "policy" else "SEQ_CLS"),
            {lr.PEFT_PREFIX + k: v for k, v in tensors.items()})
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
        out[role] = (path, {m: (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"]) for m in modules})
    return out


def _lora_models(backend, ckpt, cfg, adapters, dtype) -> dict:
    """{"policy": .., "critic": ..}: the backend's models built with `cfg`'s LoRA options and the
    `adapters` (start_adapters) loaded (the critic: the policy's backbone, the seeded head)."""
    import importlib

    models = importlib.import_module(f"ppo_{backend}.models")
    lora = importlib.import_module(f"ppo_{backend}.models.lora")
    policy = models.load_pretrained(ckpt, dtype, options=cfg.model_options("policy"))
    critic = models.scalar_model_from_lm(ckpt, seed=cfg.seed, dtype=dtype, options=cfg.model_options("critic"))
    return {"policy": lora.load_adapter(policy, adapters["policy"][0]),
            "critic": lora.load_adapter(critic, adapters["critic"][0])}


def _iteration(ckpt, reward, reference, ref_kw, cfg, q, qm, noise, dtype, adapters=None) -> dict:
    """One iteration of each trainer and of the reference in `dtype`:
    name -> (rollout arrays, stats, weights), and the start weights. `adapters` (LoRA:
    `start_adapters`): every run starts from them."""
    from transformers import AutoTokenizer

    import ppo_jax.ppo as jp
    import ppo_torch.ppo as tp

    kw = dict(config=cfg, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype=dtype, tokenizer=str(ckpt),
              reference=None if reference is None else str(reference))
    policy, critic = {"jax": str(ckpt), "torch": str(ckpt)}, {"jax": None, "torch": None}
    if adapters is not None:
        for name in policy:
            with x64_if(dtype):
                built = _lora_models(name, ckpt, cfg, adapters, dtype)
            policy[name], critic[name] = built["policy"], built["critic"]
        ref_kw = {**ref_kw, "lora": {"alpha": cfg.lora_alpha, **{r: a[1] for r, a in adapters.items()}}}
    with x64_if(dtype):
        tj = jp.PPOTrainer(policy["jax"], reward, critic=critic["jax"], **kw)
        start = weights(tj)
        G = cfg.num_generations
        qr, qmr = np.repeat(q, G, axis=0), np.repeat(qm, G, axis=0)  # the rollout's rows
        rj = tj.rollout(qr, qmr, iteration=0, noise=noise).arrays()
        sj = tj.step(0, query_ids=q, query_mask=qm, noise=noise)
        wj = weights(tj)
    tt = tp.PPOTrainer(policy["torch"], reward, critic=critic["torch"], device="cpu", **kw)
    rt = tt.rollout(qr, qmr, iteration=0, noise=noise).arrays()
    st = tt.step(0, query_ids=q, query_mask=qm, noise=noise)
    wt = weights(tt)
    ref = reference_ppo.ppo_iteration(
        ckpt, query_ids=qr, query_mask=qmr, noise=noise, cfg=cfg.to_dict(), eos_id=EOS_ID,
        pad_id=PAD_ID, tokenizer=AutoTokenizer.from_pretrained(str(ckpt)),
        minibatch_rows=seeds.minibatch_indices(cfg.seed, 0, batch_size=cfg.rollout_size, ppo_epochs=2,
                                               num_minibatches=2),
        dtype=getattr(torch, dtype), **ref_kw)
    wr = {f"{role}.{k}": v for role in ("policy", "critic") for k, v in ref[role].items()}
    assert set(wj) <= set(wr), set(wj) - set(wr)  # (the reference also lists the tied lm_head)
    return {"jax": (rj, sj, wj), "torch": (rt, st, wt), "reference": (ref["rollout"], ref["stats"], wr),
            "start": start}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_trainers_match_the_independent_reference(tiny_checkpoint, tmp_path, setting):
    ckpt = tiny_checkpoint("gpt2")
    cfg = PPOConfig(batch_size=B, max_prompt_len=P, max_new_tokens=N, learning_rate=1e-3,
                    temperature=0.9, ppo_epochs=2, num_minibatches=2, **SETTINGS[setting])
    adapters = None
    if setting == "reward-fn-lora":  # the reference: the policy's base, its adapters off
        reward, reference, adapters = _reward_fn, None, start_adapters(ckpt, cfg, tmp_path)
        ref_kw = dict(reward_fn=_reward_fn, critic_head=init_score_head(64, cfg.seed))
    elif setting.startswith("reward-fn"):
        reward, reference = _reward_fn, tiny_checkpoint("gpt2", seed=5)
        ref_kw = dict(reward_fn=_reward_fn, reference_dir=reference,
                      critic_head=init_score_head(64, cfg.seed))
    else:
        reward = tiny_checkpoint("gpt2", kind="scalar", seed=7, reward_gain=5.0, reward_bias=-15.0)
        reference = None
        ref_kw = dict(reward_dir=reward)
    q, qm, noise = inputs(512, 0, cfg.num_generations)
    reward = reward if callable(reward) else str(reward)
    out = {dtype: _iteration(ckpt, reward, reference, ref_kw, cfg, q, qm, noise, dtype, adapters)
           for dtype in ("float64", "float32")}
    o32, o64 = out["float32"], out["float64"]
    assert 0 < o64["reference"][1]["gen/eos_frac"] < 1
    if setting in ("reward-fn", "reward-fn-lora"):
        assert abs(o64["reference"][1]["objective/kl"]) > 1e-2  # the KL penalty is in play
    if adapters is not None:  # what trains: the adapters and the critic's head; the base does not
        start = o64["start"]
        trained = [k for k in start if ".lora_" in k or k == "critic.score.weight"]
        assert {k.split(".", 1)[0] for k in trained if ".lora_B." in k} == {"policy", "critic"}
        for name in ("reference", "jax", "torch"):
            w = o64[name][2]
            assert not [k for k in start if k not in trained and not np.array_equal(w[k], start[k])], name
            assert min(float(np.abs(w[k] - start[k]).max()) for k in trained) > 1e-5, name
    same_tokens(*(o[name][0] for o in (o32, o64) for name in ("reference", "jax", "torch")))
    for name in ("jax", "torch"):
        (r32, s32, w32), (R32, S32, W32) = o32[name], o32["reference"]
        (r64, s64, w64), (R64, S64, W64) = o64[name], o64["reference"]
        # float32 first (test_ppo_parity.py says why): the rollout is one forward pass of the
        # same weights; the stats and weights come after the update
        compare_arrays({k: R32[k] for k in ROLLOUT_KEYS}, r32, "float32", "start", f"{name} rollout")
        keys = [k for k in (*STATS, "loss/kl_avg") if k in s64]  # critic-free: no value loss
        assert set(keys) | {"loss/value_avg", "val/clipfrac_avg"} >= set(STATS)
        explained_stats(S32, s32, S64, s64, "start", keys=keys, what=name)
        explained_weights(W32, w32, W64, w64, keys=list(w32), what=name)
        compare_arrays({k: R64[k] for k in ROLLOUT_KEYS}, r64, "float64", "start", f"{name} rollout")
        compare_stats(S64, s64, "float64", "start", keys=keys, what=name)
        compare_weights(w64, W64, o64["start"])
