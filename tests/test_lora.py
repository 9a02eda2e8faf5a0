"""LoRA in both cores (`ppo_rlhf.lora`, `ppo_jax.models.lora`, `ppo_torch.models.lora`): the
options and their one check, what gets adapters, only the adapters trainable, the switch that
turns them off (the base model's logits), rebuild and loading errors. Parity with peft:
parity_tests/test_lora_parity.py."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_jax.models import lora as jl
from ppo_rlhf import PPOConfig
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions, RMConfig, SFTConfig
from ppo_rlhf.errors import CheckpointError
from ppo_torch.models import lora as tl

LORA = ModelOptions(lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v", "up"))
IDS = np.array([[5, 9, 2, 7, 1, 3], [4, 4, 8, 0, 2, 6]])
MASK = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


# ---- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("lora_rank", -1, r"PPOConfig.lora_rank=-1 is invalid: allowed an integer >= 0"),
    ("lora_rank", 2.0, r"PPOConfig.lora_rank=2.0 is invalid"),
    ("lora_alpha", 0.0, r"PPOConfig.lora_alpha=0.0 is invalid: allowed a finite number > 0"),
    ("lora_alpha", float("nan"), r"PPOConfig.lora_alpha=nan is invalid"),
    ("lora_dropout", 1.0, r"PPOConfig.lora_dropout=1.0 is invalid: allowed a number in \[0, 1\)"),
    ("lora_targets", ("q", "query"), r"PPOConfig.lora_targets=\('q', 'query'\) is invalid: allowed "
                                     r"distinct names among q, k, v, o, gate, up, down"),
    ("lora_targets", (), r"PPOConfig.lora_targets=\(\) is invalid"),
    ("lora_base_dtype", "float16", r"PPOConfig.lora_base_dtype='float16' is invalid: allowed None or one of "
                                   r"'float32', 'bfloat16'"),
    ("lora_base_dtype", "bfloat16", r"PPOConfig.lora_base_dtype='bfloat16' needs LoRA \(lora_rank > 0\)"),
    ("lora_roles", ("policy", "reward"), r"PPOConfig.lora_roles=\('policy', 'reward'\) is invalid: "
                                         r"allowed distinct names among policy, critic"),
])
def test_bad_values_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        PPOConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_options_checked_once_everywhere():
    with pytest.raises(ValueError, match=r"ModelOptions.lora_targets=\('x',\) is invalid"):
        ModelOptions(lora_targets=("x",))
    with pytest.raises(ValueError, match=r"RMConfig.lora_roles=\('policy',\) is invalid: allowed distinct names "
                                         r"among reward"):
        RMConfig(lora_roles=("policy",))
    with pytest.raises(ValueError, match=r"SFTConfig.lora_rank=-2 is invalid"):
        SFTConfig(lora_rank=-2)
    with pytest.raises(ValueError, match=r"lora_roles=\('policy', 'critic'\) is invalid: allowed no 'critic' "
                                         r"with advantage_estimator='grpo'"):
        PPOConfig(lora_rank=4, lora_roles=("policy", "critic"), advantage_estimator="grpo", num_generations=2)


def test_options_of_each_role_and_json():
    cfg = PPOConfig(lora_rank=4, lora_alpha=16, lora_targets="q,k,down", lora_roles=["policy", "critic"])
    assert cfg.lora_targets == ("q", "k", "down") and cfg.lora_roles == ("policy", "critic")
    assert PPOConfig.from_dict(json.loads(cfg.to_json())) == cfg  # JSON lists come back as tuples
    want = ModelOptions(lora_rank=4, lora_alpha=16, lora_targets=("q", "k", "down"))
    assert cfg.model_options("policy") == cfg.model_options("critic") == want
    assert cfg.model_options("reference") == ModelOptions() and not cfg.model_options("reward").lora
    assert PPOConfig(lora_rank=4).model_options("critic") == ModelOptions()  # default roles: policy
    assert PPOConfig().model_options() == ModelOptions() and not ModelOptions().lora
    with pytest.raises(NotImplementedError, match="do not train LoRA adapters yet"):
        cfg.model_options()  # a trainer that does not build adapters refuses instead of ignoring them
    assert RMConfig(lora_rank=2).model_options("reward").lora_rank == 2


def test_targets_per_architecture():
    assert lr.lora_modules("llama", ("q", "gate")) == ("mlp.gate_proj", "self_attn.q_proj")
    assert lr.lora_modules("gpt2", ("q", "k", "o")) == ("attn.c_attn", "attn.c_proj")  # fused q/k/v
    assert lr.lora_modules("gpt_neox", ("v", "down")) == ("attention.query_key_value", "mlp.dense_4h_to_h")
    with pytest.raises(ValueError, match=r"lora_targets \['gate'\] do not exist in a gpt2 model"):
        lr.lora_modules("gpt2", ("q", "gate"))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_build_errors(tiny_checkpoint, backend):
    models = jm if backend == "jax" else tm
    with pytest.raises(ValueError, match=r"\['gate'\] do not exist in a gpt2 model"):
        models.load_pretrained(tiny_checkpoint("gpt2"), options=ModelOptions(lora_rank=2, lora_targets=("gate",)))


# ---- the models -------------------------------------------------------------------------------
def _random_adapter(model, path, seed=0):
    """A PEFT adapter dir of `model`'s shapes with random nonzero A and B (written with numpy)."""
    rng = np.random.default_rng(seed)
    core = model.lm if hasattr(model, "lm") else model
    options = core.config.options if hasattr(core.config, "options") else core.options
    model_type = core.config.model_type
    shapes = {k: v.shape for k, v in (jl.adapter_tensors(model) if isinstance(model, nnx.Module)
                                      else tl.adapter_tensors(model)).items()}
    tensors = {lr.PEFT_PREFIX + k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    config = lr.peft_config(model_type=model_type, rank=options.lora_rank, alpha=options.lora_alpha,
                            dropout=0.0, modules=lr.lora_modules(model_type, options.lora_targets))
    return lr.write_adapter(path, config, tensors)


def _jax_logits(model):
    return np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))


@torch.no_grad()
def _torch_logits(model):
    return model(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).numpy()


@pytest.mark.parametrize("arch", ["llama"])  # GPT-2 with adapters: parity_tests/test_lora_parity.py
def test_jax_adapters_train_alone_and_switch_off(tiny_checkpoint, tmp_path, arch):
    path = tiny_checkpoint(arch)
    base = jm.load_pretrained(path)
    lm = jm.load_pretrained(path, options=LORA)
    real = MASK == 1
    # a fresh adapter (B = 0) changes nothing; the base weights are the checkpoint's
    np.testing.assert_array_equal(_jax_logits(lm), _jax_logits(base))
    base_t, lm_t = jm.model_tensors(base), jm.model_tensors(lm)
    assert base_t.keys() == lm_t.keys() and all(np.array_equal(base_t[k], lm_t[k]) for k in base_t)
    # the adapters, stacked over layers, are the only nnx.LoRAParam
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(lm, jl.ADAPTER_PARAMS))]
    modules = {".".join(str(x) for x in p[3:-1]) for p in paths}
    assert modules == set(lr.lora_modules(arch, LORA.lora_targets)) and all(p[2] == "stack" for p in paths)
    assert all(v.shape[0] == lm.config.num_layers for _, v in nnx.to_flat_state(nnx.state(lm, jl.ADAPTER_PARAMS)))

    # gradients with respect to the adapters only (what an optimiser with wrt=ADAPTER_PARAMS sees)
    def loss(model):
        return jnp.mean(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jl.ADAPTER_PARAMS))(lm)
    leaves = nnx.to_flat_state(grads)
    assert {p for p, _ in leaves} == set(paths)
    assert any(np.abs(np.asarray(g[...])).max() > 0 for _, g in leaves)  # B's gradient is not zero

    lm = jl.load_adapter(lm, _random_adapter(lm, tmp_path / "a"))
    on = _jax_logits(lm)
    assert np.abs(on[real] - _jax_logits(base)[real]).max() > 0.1
    with jl.adapters_disabled(lm):
        np.testing.assert_array_equal(_jax_logits(lm), _jax_logits(base))
        graphdef, state = nnx.split(lm)  # a jitted program of the base model from the same state
    off = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))(state)
    np.testing.assert_allclose(np.asarray(off), _jax_logits(base), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(_jax_logits(lm), on)  # on again after the block
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        with jl.adapters_disabled(base):
            pass


@pytest.mark.parametrize("arch", ["llama"])  # GPT-2 with adapters: parity_tests/test_lora_parity.py
def test_torch_adapters_train_alone_and_switch_off(tiny_checkpoint, tmp_path, arch):
    path = tiny_checkpoint(arch)
    base = tm.load_pretrained(path)
    lm = tm.load_pretrained(path, options=LORA)
    real = MASK == 1
    np.testing.assert_array_equal(_torch_logits(lm), _torch_logits(base))
    base_t, lm_t = tm.model_tensors(base), tm.model_tensors(lm)
    assert base_t.keys() == lm_t.keys() and all(np.array_equal(base_t[k], lm_t[k]) for k in base_t)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    modules = {re.split(r"\.\d+\.", n, maxsplit=1)[1].rsplit(".lora_", 1)[0] for n in trainable}
    assert modules == set(lr.lora_modules(arch, LORA.lora_targets))
    assert len(trainable) == 2 * lm.config.num_hidden_layers * len(modules)  # A and B per layer

    lm = tl.load_adapter(lm, _random_adapter(lm, tmp_path / "a"))
    on = _torch_logits(lm)
    assert np.abs(on[real] - _torch_logits(base)[real]).max() > 0.1
    with tl.adapters_disabled(lm):
        np.testing.assert_array_equal(_torch_logits(lm), _torch_logits(base))
    np.testing.assert_array_equal(_torch_logits(lm), on)  # on again after the block
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == trainable  # still the adapters
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        with tl.adapters_disabled(base):
            pass


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_rebuild_keeps_adapters_and_loading_is_strict(tiny_checkpoint, tmp_path, backend):
    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    path = tiny_checkpoint("llama")
    lm = models.load_pretrained(path, options=LORA)
    lm = lora.load_adapter(lm, _random_adapter(lm, tmp_path / "a"))
    logits = (_jax_logits if backend == "jax" else _torch_logits)(lm)
    same = models.rebuild(lm, options=LORA.frozen(), copy=True)
    np.testing.assert_array_equal((_jax_logits if backend == "jax" else _torch_logits)(same), logits)
    with pytest.raises(ValueError, match="rebuild keeps the model's LoRA adapters as built"):
        models.rebuild(lm, options=ModelOptions())
    with pytest.raises(CheckpointError, match="adapter r=2, lora_alpha=4.0; the model was built with lora_rank=4"):
        rank4 = ModelOptions(lora_rank=4, lora_targets=("q", "v", "up"))
        lora.load_adapter(models.load_pretrained(path, options=rank4), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"missing .*k_proj"):
        lora.load_adapter(models.load_pretrained(path, options=ModelOptions(
            lora_rank=2, lora_alpha=4.0, lora_targets=("q", "k", "v", "up"))), tmp_path / "a")


# ---- PPO with LoRA on the policy ----------------------------------------------------------------
def _optimised(trainer) -> tuple[set, int]:
    """(the names of the parameters the trainer's optimiser updates, the number of its float
    state entries -- AdamW's moments)."""
    if trainer.backend == "jax":
        names = {f"{role}." + ".".join(map(str, p)) for role, tree in trainer.params.items()
                 for p, _ in nnx.to_flat_state(tree)}
        moments = sum(np.size(x) for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x) > 0)
        return names, moments
    ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    names = {f"{role}.{n}" for role, m in (("policy", trainer.policy), ("critic", trainer.critic))
             if m is not None for n, p in m.named_parameters() if id(p) in ids}
    moments = sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0)
    return names, moments


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_trains_the_adapters_and_the_policys_base_is_the_reference(tiny_checkpoint, tmp_path, backend):
    """LoRA on policy and critic: the optimiser holds their adapters and the critic's score head
    only (no gradient, no AdamW moment for a base weight); an update leaves every base weight
    bit-identical while adapters and head move; the reference -- no model of its own -- gives the
    log-probs of a separately loaded base model, not the policy's; the merged checkpoints
    (`save_policy(merge=True)`, `save_critic`) compute what the LoRA models compute."""
    from tests.helpers import make_trainer

    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    ckpt = tiny_checkpoint("llama")
    t = make_trainer(backend, ckpt, lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v"),
                     lora_roles=("policy", "critic"), learning_rate=3e-2,
                     **({"device": "cpu"} if backend == "torch" else {}))
    assert t.reference_is_policy and models.model_options(t.critic_model()).lora
    policy, critic = t.policy_model(), t.critic_model()
    adapters = {**lora.adapter_tensors(policy), **{"critic." + k: v for k, v in lora.adapter_tensors(critic).items()}}
    base = {**models.model_tensors(policy), **{"critic." + k: v for k, v in models.model_tensors(critic).items()}}
    t.step()
    names, moments = _optimised(t)
    assert names and all("lora_" in n for n in names if n.startswith("policy.")), sorted(names)[:4]
    heads = {n for n in names if n.startswith("critic.") and "lora_" not in n}
    assert len(heads) == 1 and "score" in heads.pop()
    head = "critic.score.weight"
    assert moments == 2 * (sum(v.size for v in adapters.values()) + base[head].size)  # mu and nu
    policy, critic = t.policy_model(), t.critic_model()
    after = {**models.model_tensors(policy), **{"critic." + k: v for k, v in models.model_tensors(critic).items()}}
    assert after.keys() == base.keys()
    assert all(np.array_equal(after[k], base[k]) for k in base if k != head)
    assert np.abs(after[head] - base[head]).max() > 1e-4
    moved = {**lora.adapter_tensors(policy), **{"critic." + k: v for k, v in lora.adapter_tensors(critic).items()}}
    for who in ("model.", "critic."):
        assert max(np.abs(moved[k] - adapters[k]).max() for k in adapters
                   if k.startswith(who) and ".lora_B." in k) > 1e-4

    q = np.array([[0, 0, 5, 9, 2, 7, 1, 3], [4, 4, 8, 2, 2, 6, 7, 9]] * 2)
    qm = (np.arange(8) >= np.array([[2], [0]] * 2)).astype(np.int32)
    batch = t.rollout(q, qm, iteration=1)
    base_lm = models.load_pretrained(ckpt)
    args = [batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask]
    if backend == "jax":
        want = np.asarray(models.response_logprobs(base_lm, *map(jnp.asarray, args), temperature=t.config.temperature))
    else:
        with torch.no_grad():
            want = models.response_logprobs(base_lm, *(torch.from_numpy(np.asarray(a)).long() for a in args),
                                            temperature=t.config.temperature).numpy()
    real = batch.response_mask.astype(bool)
    np.testing.assert_allclose(batch.ref_logprobs[real], want[real], rtol=0, atol=2e-5)
    assert np.abs(batch.logprobs - batch.ref_logprobs)[real].max() > 1e-3  # the adapters count

    t.save_policy(tmp_path / "merged", merge=True)  # a full checkpoint: the adapters merged in
    merged = models.load_pretrained(tmp_path / "merged")
    logits = _jax_logits if backend == "jax" else _torch_logits
    assert not models.model_options(merged).lora
    np.testing.assert_allclose(logits(merged), logits(policy), rtol=0, atol=2e-5)
    t.save_critic(tmp_path / "critic")  # merged: a plain scalar model with the critic's values
    saved = models.load_scalar_model(tmp_path / "critic")
    if backend == "jax":
        got, want = (np.asarray(m.values(jnp.asarray(IDS), jnp.asarray(MASK))) for m in (saved, critic))
    else:
        with torch.no_grad():
            got, want = (m.values(torch.from_numpy(IDS), torch.from_numpy(MASK)).numpy() for m in (saved, critic))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("lora_critic", [True, False])
def test_a_lora_critic_shares_the_reward_models_base(tiny_checkpoint, backend, lora_critic):
    """A LoRA critic made from the reward model holds the reward model's base weights themselves
    (the same arrays / storage: the trunk in memory once); its head is its own. After an update
    the reward model is bit-identical (nothing written through the shared weights) and the
    critic's head moved. A critic without LoRA trains every weight: nothing shared."""
    from tests.helpers import make_trainer

    models = jm if backend == "jax" else tm
    ckpt = tiny_checkpoint("llama")
    rm = models.scalar_model_from_lm(str(ckpt), seed=1)
    t = make_trainer(backend, ckpt, reward=rm, lora_rank=2, lora_alpha=4.0, learning_rate=3e-2,
                     lora_roles=("policy", "critic") if lora_critic else ("policy",),
                     **({"device": "cpu"} if backend == "torch" else {}))
    if backend == "jax":
        import jax

        rm_ids = {id(a) for a in jax.tree.leaves(t.reward.params)}
        critic = list(jax.tree.leaves(t.base["critic"])) + list(jax.tree.leaves(t.params["critic"]))
        shared = [id(a) in rm_ids for a in critic]
    else:
        rm_ptrs = {p.data_ptr() for p in t.reward_model().parameters()}
        shared = [p.data_ptr() in rm_ptrs for p in t.critic_model().parameters()]
    trunk = len(rm_ids if backend == "jax" else rm_ptrs) - 1  # every reward-model weight but its head
    frozen_rm = models.model_tensors(t.reward_model())
    head = models.model_tensors(t.critic_model())["score.weight"]
    assert sum(shared) == (trunk if lora_critic else 0), (sum(shared), trunk)
    t.step()
    after = models.model_tensors(t.reward_model())
    assert all(np.array_equal(after[k], v) for k, v in frozen_rm.items())
    assert np.abs(models.model_tensors(t.critic_model())["score.weight"] - head).max() > 1e-4


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_lora_checkpoints_hold_what_is_trained_and_resume_exactly(tiny_checkpoint, tmp_path, backend):
    """With LoRA on the policy a checkpoint holds the adapters (and the full critic), not the
    base; its policy/ is a PEFT adapter pointing to the base checkpoint, which loads back onto
    the base with the trained policy's logits; a run resumed from it ends where an uninterrupted
    run ends, bit for bit."""
    from parity_tests.ppo_inputs import weights
    from tests.helpers import make_trainer

    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    ckpt = tiny_checkpoint("llama")
    kw = dict(lora_rank=2, lora_targets=("q", "v"), learning_rate=1e-2,
              **({"device": "cpu"} if backend == "torch" else {}))
    logits = _jax_logits if backend == "jax" else _torch_logits
    straight = make_trainer(backend, ckpt, **kw)
    straight.train(1, progress=False)
    at_one = logits(straight.policy_model())
    straight.train(2, progress=False)
    out = tmp_path / "run"
    make_trainer(backend, ckpt, out_dir=out, checkpoint_every=1, **kw).train(1, progress=False)
    [saved] = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
    if backend == "torch":
        from safetensors.numpy import load_file
        keys = load_file(str(saved / "state" / "model.safetensors")).keys()
        assert keys and all(".lora_" in k or k.startswith("critic.") for k in keys), sorted(keys)[:4]
    policy_dir = saved / "policy"
    assert not (policy_dir / "model.safetensors").exists()
    config = json.loads((policy_dir / lr.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(ckpt.absolute())
    loaded = lora.load_adapter(models.load_pretrained(ckpt, options=lora.adapter_options(policy_dir, ckpt)),
                               policy_dir)
    direct = models.load_pretrained(policy_dir)  # an adapter dir: its base (the pointer) + the adapter
    with pytest.raises(CheckpointError, match="adapter r=2.*asked for lora_rank=4"):
        models.load_pretrained(policy_dir, options=ModelOptions(lora_rank=4))

    resumed = make_trainer(backend, ckpt, out_dir=out, **kw)
    resumed.train(2, resume=True, progress=False)
    assert [h["iteration"] for h in resumed.history] == [1]
    a, b = weights(resumed), weights(straight)
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:4]
    np.testing.assert_allclose(logits(loaded), at_one, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(logits(direct), logits(loaded))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_reward_model_and_sft_trainers_train_the_adapters(tiny_checkpoint, tmp_path, backend):
    """RMConfig / SFTConfig with lora_rank: the trainers train the adapters (and the reward
    model's head) only, the base weights stay as loaded; the saved model is the PEFT adapter
    pointing to the checkpoint it started from (loaded with the model's LoRA options: the
    adapters kept) and with merge=True the merged full checkpoint, each computing what the LoRA
    model computes."""
    import importlib

    from ppo_rlhf.config import RMConfig, SFTConfig
    from tests.test_reward_model import toy_pairs

    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    rm_mod = importlib.import_module(f"ppo_{backend}.reward_model")
    sft_mod = importlib.import_module(f"ppo_{backend}.sft")
    ckpt = tiny_checkpoint("llama")
    lora_kw = dict(lora_rank=2, lora_targets=("q", "v"), learning_rate=1e-2, lr_schedule="constant",
                   batch_size=4, max_length=24)
    rm = rm_mod.RewardModelTrainer(str(ckpt), RMConfig(num_epochs=1, **lora_kw))
    sft = sft_mod.SFTTrainer(str(ckpt), SFTConfig(num_steps=2, **lora_kw))
    for t, fit in ((rm, lambda: rm.fit(toy_pairs(8), progress=False)),
                   (sft, lambda: sft.fit(["a b c d e f", "g h i", "j k l m", "n o p"] * 2, progress=False))):
        model = t.model()
        assert models.model_options(model).lora
        base, adapters = models.model_tensors(model), lora.adapter_tensors(model)
        fit()
        model = t.model()
        after, moved = models.model_tensors(model), lora.adapter_tensors(model)
        changed = sorted(k for k in base if not np.array_equal(after[k], base[k]))
        assert changed == (["score.weight"] if t is rm else []), changed
        assert max(np.abs(moved[k] - adapters[k]).max() for k in adapters if ".lora_B." in k) > 1e-4
        load = models.load_scalar_model if t is rm else models.load_pretrained
        t.save_model(tmp_path / type(t).__name__)  # the PEFT adapter, pointing to its base
        t.save_model(tmp_path / "merged" / type(t).__name__, merge=True)
        adapter = json.loads((tmp_path / type(t).__name__ / lr.ADAPTER_CONFIG).read_text())
        assert adapter["base_model_name_or_path"] == str(ckpt.absolute())
        for saved, lora_kept in ((load(tmp_path / "merged" / type(t).__name__), False),
                                 (load(tmp_path / type(t).__name__, options=models.model_options(model)), True)):
            assert models.model_options(saved).lora == lora_kept
            if backend == "jax":
                got, want = (np.asarray(m(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))) for m in (saved, model))
            else:
                with torch.no_grad():
                    got, want = (m(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).numpy()
                                 for m in (saved, model))
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_shared_trunk_with_lora_trains_adapters_and_value_head(tiny_checkpoint, backend):
    """A PolicyWithValueHead built with LoRA: the adapters and the value head are trained, the
    trunk's base weights stay as loaded, the reference is the trunk with its adapters off."""
    from ppo_rlhf import PPOConfig
    from tests.helpers import make_trainer

    models = jm if backend == "jax" else tm
    ckpt = tiny_checkpoint("llama")
    kw = dict(lora_rank=2, lora_targets=("q", "v"), learning_rate=1e-2)
    policy = models.load_pretrained(ckpt, with_value_head=True, seed=3,
                                    options=PPOConfig(**kw).model_options("policy"))
    t = make_trainer(backend, ckpt, policy=policy, tokenizer=str(ckpt), **kw,
                     **({"device": "cpu"} if backend == "torch" else {}))
    assert t.shared_trunk and t.reference_is_policy
    base = models.model_tensors(t.policy_model())
    t.step()
    names, _ = _optimised(t)
    assert {n for n in names if "lora_" not in n} in ({"policy.value_head.kernel"}, {"policy.value_head.weight"})
    after = models.model_tensors(t.policy_model())
    assert all(np.array_equal(after[k], base[k]) for k in base)


# ---- adapter dropout (lora_dropout > 0) -------------------------------------------------------------
def _identity_adapter(backend, ckpt, p):
    """(one adapted projection whose output is exactly the adapter's input after dropout -- base
    weight 0, A = B = I, scale 1 --, the model holding it, a call of the projection on x)."""
    options = ModelOptions(lora_rank=64, lora_alpha=64.0, lora_dropout=p, lora_targets=("q",))
    eye = np.eye(64, dtype=np.float32)
    if backend == "jax":
        m = jl.LoRALinear(64, 64, rank=64, alpha=64.0, use_bias=False, dtype=jnp.float32,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0), dropout=p)
        m.kernel[...], m.lora_a[...], m.lora_b[...] = jnp.zeros((64, 64)), jnp.asarray(eye), jnp.asarray(eye)
        return m, m, lambda x: np.asarray(m(jnp.asarray(x)))
    lm = tm.load_pretrained(ckpt, options=options)
    layer = tl.lora_layers(lm)[0]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A[tl.ADAPTER].weight.copy_(torch.from_numpy(eye))
        layer.lora_B[tl.ADAPTER].weight.copy_(torch.from_numpy(eye))
    return layer, lm, lambda x: layer(torch.from_numpy(x)).detach().numpy()


def _dropout_on(backend, model, seed):
    return (jl.adapter_dropout(model, jax.random.key(seed)) if backend == "jax"
            else tl.adapter_dropout(model, seed))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lora_dropout_masks_and_scales_the_adapter_input_in_training_only(tiny_checkpoint, backend):
    """peft's semantics, y = base(x) + B(A(dropout(x))) * alpha / rank: inside `adapter_dropout`
    each element of the adapter's input is kept with probability 1 - p and scaled by 1 / (1 - p)
    (the kept fraction within 5 binomial sigmas of 1 - p over 8192 elements); outside it the
    projection is deterministic and computes the input unchanged (as rate 0); the same seed draws
    the same mask, another seed another."""
    p = 0.25
    layer, model, run = _identity_adapter(backend, tiny_checkpoint("llama"), p)
    x = np.ones((8, 16, 64), np.float32)
    np.testing.assert_array_equal(run(x), x)  # eval: no dropout
    with _dropout_on(backend, model, 1):
        y = run(x)
    with _dropout_on(backend, model, 1):
        again = run(x)
    with _dropout_on(backend, model, 2):
        other = run(x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)  # kept and scaled, nothing else
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size), kept.mean()
    np.testing.assert_array_equal(y, again)
    assert (other != y).mean() > 0.1
    np.testing.assert_array_equal(run(x), x)  # restored on exit


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lora_dropout_off_outside_training_and_distinct_per_layer(tiny_checkpoint, tmp_path, backend):
    """A model built with lora_dropout=0.3 computes, outside `adapter_dropout` (generation,
    rollout, reference, evaluation, scoring), exactly what the same adapters compute at rate 0
    (bit-equal logits); inside it the logits change. JAX: every projection of every layer of
    the scanned stack gets its own key, so masks differ between layers (a per-layer mask needs
    no Python loop: the key is sliced by the scan with the weights)."""
    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    ckpt = tiny_checkpoint("llama")
    plain, dropped = (models.load_pretrained(ckpt, options=dataclasses.replace(LORA, lora_dropout=p))
                      for p in (0.0, 0.3))
    adapter = _random_adapter(plain, tmp_path / "adapter")
    plain, dropped = lora.load_adapter(plain, adapter), lora.load_adapter(dropped, adapter)
    logits = _jax_logits if backend == "jax" else _torch_logits
    np.testing.assert_array_equal(logits(dropped), logits(plain))
    with _dropout_on(backend, dropped, 0):
        training = logits(dropped)
        if backend == "jax":
            keys = [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(dropped, jl.LoRADropoutKey))]
            rows = [tuple(k) for stack in keys for k in stack]
            assert len(keys) == 3 and all(k.shape[0] == 2 for k in keys)  # q, v, up; 2 layers each
            assert len(set(rows)) == len(rows), rows  # one key per projection and layer
    assert np.abs(training - logits(plain)).max() > 1e-3
    np.testing.assert_array_equal(logits(dropped), logits(plain))  # restored
    with lora.adapters_disabled(dropped):
        base = logits(dropped)
    with _dropout_on(backend, dropped, 0), lora.adapters_disabled(dropped):
        np.testing.assert_array_equal(logits(dropped), base)  # the reference: no adapters, no dropout


def test_jax_update_draws_random_numbers_only_with_lora_dropout(tiny_checkpoint):
    """Rate 0 compiles the update of a model without dropout: no key argument and no random
    number in the program (the same program as before dropout existed); with a rate the update
    takes its key and draws masks from it (threefry)."""
    from tests.helpers import make_trainer

    for p in (0.0, 0.3):
        t = make_trainer("jax", tiny_checkpoint("llama"), lora_rank=2, lora_dropout=p)
        fn, args, _ = t.programs()["update"]
        text = fn.lower(*args).as_text()
        assert (len(args), "threefry" in text) == ((6, True) if p else (5, False)), (p, len(args))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_with_lora_dropout_reproducible_seeded_and_resumes_exactly(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       backend):
    """PPO with lora_dropout on policy and critic runs; dropout acts in the update only -- the
    rollout's log-probs of the first iteration equal those of a rate-0 run, the updated weights
    do not --; two runs with the same seed end bit-identical, a run whose dropout seed alone
    differs does not; a run resumed from a checkpoint ends where the uninterrupted one ends."""
    from parity_tests.ppo_inputs import weights
    from ppo_rlhf.runtime import seeds
    from tests.helpers import make_trainer

    ckpt = tiny_checkpoint("llama")
    kw = dict(lora_rank=2, lora_targets=("q", "v"), lora_roles=("policy", "critic"), learning_rate=1e-2,
              grad_accum_steps=2, **({"device": "cpu"} if backend == "torch" else {}))

    def run(p, iterations=2, **more):
        t = make_trainer(backend, ckpt, lora_dropout=p, **kw, **more)
        t.train(iterations, progress=False)
        return t

    first = run(0.3)
    second, plain = run(0.3), run(0.0)
    a, b, c = weights(first), weights(second), weights(plain)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if ".lora_B." in k)
    np.testing.assert_array_equal(first.history[0]["objective/kl"], plain.history[0]["objective/kl"])
    original = seeds.dropout_seed
    monkeypatch.setattr(seeds, "dropout_seed", lambda seed, *pos: original(seed + 1, *pos))
    reseeded = weights(run(0.3))
    assert any(not np.array_equal(a[k], reseeded[k]) for k in a if ".lora_B." in k)
    monkeypatch.undo()

    out = tmp_path / "run"
    run(0.3, 1, out_dir=out, checkpoint_every=1)
    resumed = make_trainer(backend, ckpt, lora_dropout=0.3, out_dir=out, **kw)
    resumed.train(2, resume=True, progress=False)
    r = weights(resumed)
    assert all(np.array_equal(r[k], a[k]) for k in a), [k for k in a if not np.array_equal(r[k], a[k])][:4]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_reward_model_and_sft_steps_with_lora_dropout(tiny_checkpoint, tmp_path, backend):
    """The RM and SFT trainers with lora_dropout: the steps run; the same seed gives the same
    losses, bit for bit; dropout acts on the training loss (not equal to a rate-0 run's after
    the first step's adapters are nonzero) and never on scoring (the trained model scores as
    the same weights built at rate 0)."""
    import importlib

    from ppo_rlhf.config import RMConfig, SFTConfig
    from tests.test_reward_model import toy_pairs

    rm_mod = importlib.import_module(f"ppo_{backend}.reward_model")
    sft_mod = importlib.import_module(f"ppo_{backend}.sft")
    ckpt = tiny_checkpoint("llama")
    kw = dict(lora_rank=2, lora_targets=("q", "v"), learning_rate=5e-2, lr_schedule="constant",
              batch_size=4, max_length=24)
    texts = ["a b c d e f", "g h i", "j k l m", "n o p"] * 2

    def losses(p, kind):
        if kind == "rm":
            t = rm_mod.RewardModelTrainer(str(ckpt), RMConfig(num_epochs=2, lora_dropout=p, **kw))
            t.fit(toy_pairs(8), progress=False)
        else:
            t = sft_mod.SFTTrainer(str(ckpt), SFTConfig(num_steps=4, lora_dropout=p, **kw))
            t.fit(texts, progress=False)
        return t, [h["train/loss"] for h in t.history]

    for kind in ("rm", "sft"):
        t, one = losses(0.5, kind)
        _, two = losses(0.5, kind)
        _, plain = losses(0.0, kind)
        assert one == two, (kind, one, two)
        assert one[1:] != plain[1:], (kind, one, plain)
        if kind == "rm":  # scoring (evaluation) without dropout: as the merged rate-0 model scores
            t.save_model(tmp_path / backend)
            saved = (jm if backend == "jax" else tm).load_scalar_model(tmp_path / backend)
            if backend == "jax":
                want = np.asarray(saved.score(jnp.asarray(IDS), jnp.asarray(MASK)))
            else:
                with torch.no_grad():
                    want = saved.score(torch.from_numpy(IDS), torch.from_numpy(MASK)).numpy()
            raw = (want - saved.reward_bias) / saved.reward_gain  # the trainer scores the raw head
            np.testing.assert_allclose(t._score(IDS, MASK), raw, rtol=0, atol=2e-5)


# ---- the frozen base stored in the compute dtype (lora_base_dtype) ------------------------------------
def _bytes(backend, model):
    """(bytes of the frozen base weights, {trained parameter: dtype}) of a LoRA model."""
    if backend == "jax":
        trained = jl.trained_params(model)
        base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(trained)))
        return (sum(x.nbytes for x in jax.tree.leaves(base)),
                {p: str(v.dtype) for p, v in nnx.to_flat_state(nnx.state(model, trained))})
    return (sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad),
            {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad})


def test_lora_base_dtype_needs_the_compute_dtype():
    with pytest.raises(ValueError, match=r"RMConfig.lora_base_dtype='bfloat16' needs compute_dtype='bfloat16' "
                                         r"\(got None\): the base weights are stored in the compute dtype") as err:
        RMConfig(lora_rank=2, lora_base_dtype="bfloat16")
    assert "\n" not in str(err.value)
    options = SFTConfig(lora_rank=2, compute_dtype="bfloat16", lora_base_dtype="bfloat16").model_options("policy")
    assert options.base_dtype == "bfloat16"
    assert ModelOptions(lora_rank=2, lora_base_dtype="float32").base_dtype is None  # the weights' own dtype


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_lora_base_dtype_halves_the_base_and_keeps_the_trained_weights_float32(tiny_checkpoint, backend):
    """lora_base_dtype="bfloat16": the frozen base's parameter bytes are exactly half those of the
    float32 base (every base weight stored in bf16), the adapters and the score head are float32
    and equal to the float32 model's, and the model computes as the mixed-precision model with
    float32 weights up to the bf16 rounding of the embeddings and norm scales -- float32 logits
    within the mixed-precision log-prob tolerance (parity_tests/test_precision_parity.py) -- and
    the same holds after `rebuild` (the critic from a reward model)."""
    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    ckpt = tiny_checkpoint("llama", kind="scalar", seed=1)
    mixed = ModelOptions(lora_rank=2, lora_targets=("q", "v"), compute_dtype="bfloat16")
    full = models.load_scalar_model(ckpt, options=mixed)
    half = models.load_scalar_model(ckpt, options=dataclasses.replace(mixed, lora_base_dtype="bfloat16"))
    (nf, trained_f), (nh, trained_h) = _bytes(backend, full), _bytes(backend, half)
    assert nh * 2 == nf and nf > 0
    assert trained_h == trained_f and set(trained_h.values()) == {"float32"}
    assert any("score" in str(k) for k in trained_h) and any("lora" in str(k) for k in trained_h)
    for a, b in zip(lora.adapter_tensors(full).values(), lora.adapter_tensors(half).values()):
        np.testing.assert_array_equal(a, b)
    if backend == "jax":
        got, want = (np.asarray(m.score(jnp.asarray(IDS), jnp.asarray(MASK))) for m in (half, full))
    else:
        with torch.no_grad():
            got, want = (m.score(torch.from_numpy(IDS), torch.from_numpy(MASK)).numpy() for m in (half, full))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.1)
    # the residual stream starts float32: the bf16-stored embeddings are read as float32 rows
    if backend == "jax":
        [embed] = [m for _, m in nnx.iter_graph(half) if isinstance(m, nnx.Embed)][:1]
        assert embed.embedding.dtype == jnp.bfloat16 and embed(jnp.asarray(IDS)).dtype == jnp.float32
    else:
        embed = half.hf_model.get_input_embeddings()
        assert embed.weight.dtype == torch.bfloat16 and embed(torch.from_numpy(IDS)).dtype == torch.float32
    copy = models.rebuild(half, options=models.model_options(half))
    assert _bytes(backend, copy) == (nh, trained_h)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ppo_with_the_lora_base_in_bfloat16(tiny_checkpoint, backend):
    """A PPO iteration with LoRA on policy and critic and lora_base_dtype="bfloat16": the base
    weights stay bf16 and bit-identical, the adapters (float32) move, the reference is the
    policy's bf16 base with adapters off."""
    from tests.helpers import make_trainer

    models, lora = (jm, jl) if backend == "jax" else (tm, tl)
    t = make_trainer(backend, tiny_checkpoint("llama"), lora_rank=2, lora_targets=("q", "v"),
                     lora_roles=("policy", "critic"), learning_rate=3e-2, compute_dtype="bfloat16",
                     lora_base_dtype="bfloat16", **({"device": "cpu"} if backend == "torch" else {}))
    policy = t.policy_model()
    base, adapters = models.model_tensors(policy), lora.adapter_tensors(policy)
    nbytes = _bytes(backend, policy)[0]
    t.step()
    policy = t.policy_model()
    assert _bytes(backend, policy)[0] == nbytes and t.reference_is_policy
    after, moved = models.model_tensors(policy), lora.adapter_tensors(policy)
    assert all(np.array_equal(after[k], base[k]) for k in base)
    assert max(np.abs(moved[k] - adapters[k]).max() for k in adapters if ".lora_B." in k) > 1e-4
    assert all(v.dtype == np.float32 for v in moved.values())


# ---- torch.compile with peft's layers -------------------------------------------------------------
@pytest.mark.parametrize("compile_with", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compiled_lora_model_switches_its_adapters_off_and_on(tiny_checkpoint, compile_with):
    """A LoRA model's compiled forward (as `PPOTrainer(compile=...)` compiles it), called with
    the adapters on, off (`adapters_disabled`: PPO's reference), on, off: each call equals the
    uncompiled model with adapters (on) and a separately loaded base model (off). Dynamo guards
    on peft's switch: switching compiles a second graph once (a recompile, counted by the
    backend), after which both graphs are reused -- never one state's graph for the other.
    "eager" runs the captured graphs with the same kernels: bit for bit (observed); inductor
    fuses its own kernels, float32 rounding only (observed <= 3e-6 on logits ~3; bound 1e-4)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    ckpt = tiny_checkpoint("gpt2")
    lm = tm.load_pretrained(ckpt, options=ModelOptions(lora_rank=4, lora_alpha=8, lora_targets=("q", "v", "down")))
    base = tm.load_pretrained(ckpt)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.5)  # B != 0: the adapters change the logits
    ids = torch.randint(3, 500, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = {"on": lm(ids, mask), "off": base(ids, mask)}
        assert (want["on"] - want["off"]).abs().max() > 0.1  # the switch matters
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(compile_with)
        lm.forward = torch.compile(lm.forward, dynamic=False, backend=counter)
        tol = 0.0 if compile_with == "eager" else 1e-4
        frames = []
        for state in ("on", "off", "on", "off"):
            if state == "off":
                with tl.adapters_disabled(lm):
                    got = lm(ids, mask)
            else:
                got = lm(ids, mask)
            torch.testing.assert_close(got, want[state], rtol=tol, atol=tol, msg=lambda m: f"{state}: {m}")
            frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] > frames[0], frames  # compiled; the switch recompiled
    assert frames[3] == frames[1], frames  # then both graphs reused: no recompile per switch
