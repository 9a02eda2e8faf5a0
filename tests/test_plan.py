"""`ppo-rlhf plan`: a tiny model's whole PPO iteration (and reward-model / SFT training step,
`--trainer rm|sft`) compiled for a v5e:2x2 slice (four compile-only TPU chips from libtpu) from
this CPU machine, the report's bytes checked against what the chips must hold (bounds from
parameter counts), a too-large batch a clean "does not fit" (exit 1; PPO's: tests/test_plan_gpu.py,
where a small allocator share makes it cheap to compile), bad input exit 2; every
PPO program under a tensor-parallel mesh; and the abstract trainers are the real ones (same
shardings)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("libtpu", reason="ppo-rlhf plan compiles for TPU: needs libtpu (make setup)")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers load libtpu each

from ppo_rlhf.app.cli import main

CHIPS = 4
TINY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=True, eos_token_id=1, hidden_act="silu")


def qwen2_params(c: dict, *, scalar: bool = False) -> int:
    """Parameters of a qwen2 model from its config, by hand (tied embeddings): the bound's source."""
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h  # qkv (+bias), o, mlp, norms
    return V * h + L * layer + h + (h if scalar else 0)


def _write(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_plan_tiny_ppo_iteration_v5e(tmp_path, capsys):
    model = _write(tmp_path, "tiny", TINY)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(model), "--reward-model", str(model / "config.json"),
               "--topology", "v5e:2x2", "--set", "batch_size=8", "--set", "max_prompt_len=16",
               "--set", "max_new_tokens=16", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["topology"] == "v5e:2x2" and report["chips"] == CHIPS and report["fits"] is True
    assert report["hbm_bytes_per_chip"] == 16 * 1024 ** 3
    progs = {p["name"]: p for p in report["programs"]}
    assert set(progs) == {"generate", "rollout_forward", "advantages", "update"}
    for p in progs.values():
        for k in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "resident_bytes",
                  "peak_bytes", "flops"):
            assert k in p
        assert p["error"] is None and p["peak_bytes"] == p["resident_bytes"] + p["temp_bytes"]
    # what the chips must hold, from parameter counts (float32): policy + critic with AdamW's two
    # moments (12 bytes each), reference + reward model (4 bytes each). Spread over 4 chips at
    # best (a dimension that does not divide is replicated), all of it on one chip at worst.
    n_lm, n_rm = qwen2_params(TINY), qwen2_params(TINY, scalar=True)
    trained = 12 * (n_lm + n_rm)  # policy + critic (copied from the reward model)
    frozen = 4 * (n_lm + n_rm)  # reference + reward model
    assert (trained + frozen) / CHIPS <= report["resident_state_bytes"] <= trained + frozen
    upd = progs["update"]
    assert upd["argument_bytes"] >= trained / CHIPS  # params + both moments are its arguments
    assert upd["alias_bytes"] >= trained / CHIPS  # ... donated: updated in place
    assert progs["generate"]["argument_bytes"] >= 4 * n_lm / CHIPS  # the policy's weights
    assert progs["rollout_forward"]["argument_bytes"] >= (4 * (n_lm + n_rm) + frozen) / CHIPS
    assert all(p["resident_bytes"] >= report["resident_state_bytes"] for p in progs.values())
    assert report["peak_bytes"] == max(p["peak_bytes"] for p in progs.values())
    assert upd["flops"] > 0 and report["compile_s"] > 0
    # fsdp over 4 chips: the update gathers weight shards and reduces gradients across chips
    coll = upd["collective_bytes"]
    assert coll.get("all-gather", 0) > 0, coll
    assert coll.get("reduce-scatter", 0) + coll.get("all-reduce", 0) > 0, coll
    assert "verdict: FITS" in capsys.readouterr().out


@pytest.mark.parametrize("trainer", ["rm", "sft"])
def test_plan_tiny_rm_and_sft_step_v5e(tmp_path, capsys, trainer):
    model = _write(tmp_path, "tiny", TINY)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--trainer", trainer, "--model", str(model), "--topology", "v5e:2x2",
               "--set", "batch_size=8", "--set", "max_length=32", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["chips"] == CHIPS and report["fits"] is True and report["batch_size"] == 8
    progs = {p["name"]: p for p in report["programs"]}
    assert set(progs) == {"train_step", "eval_step"}
    for p in progs.values():
        assert p["error"] is None and p["peak_bytes"] == p["resident_bytes"] + p["temp_bytes"]
    # float32 weights + AdamW's two moments: 12 bytes a parameter, over 4 chips at best
    n = qwen2_params(TINY, scalar=trainer == "rm")
    assert 12 * n / CHIPS <= report["resident_state_bytes"] <= 12 * n
    step, ev = progs["train_step"], progs["eval_step"]
    assert step["argument_bytes"] >= 12 * n / CHIPS and step["alias_bytes"] >= 12 * n / CHIPS
    assert ev["argument_bytes"] >= 4 * n / CHIPS  # the weights (no optimiser state)
    assert ev["argument_bytes"] < step["argument_bytes"]
    assert all(p["resident_bytes"] >= report["resident_state_bytes"] for p in progs.values())
    assert step["flops"] > 0 and step["collective_bytes"].get("all-gather", 0) > 0
    assert "verdict: FITS" in capsys.readouterr().out


def test_plan_shows_lora_memory(tmp_path):
    """With LoRA (`--set lora_rank=R`) the plan holds the frozen base weights (4 bytes a parameter,
    no AdamW state) and the adapters with their moments, not 12 bytes for every parameter."""
    from ppo_jax.plan import plan_sft
    from ppo_rlhf import SFTConfig

    model = str(_write(tmp_path, "tiny", TINY))
    plan = plan_sft(model, SFTConfig(batch_size=8, max_length=32, lora_rank=8), topology="v5e:2x2")
    n = qwen2_params(TINY)
    h, L = TINY["hidden_size"], TINY["num_hidden_layers"]
    kv = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    adapters = L * 8 * ((h + h) + (h + kv))  # rank 8 on q and v (the default targets): A and B
    assert plan.fits
    assert (4 * n + 12 * adapters) / CHIPS <= plan.resident_state_bytes <= 4 * n + 12 * adapters
    # lora_base_dtype="bfloat16": the frozen base at 2 bytes a parameter, the adapters as before
    half = plan_sft(model, SFTConfig(batch_size=8, max_length=32, lora_rank=8, compute_dtype="bfloat16",
                                     lora_base_dtype="bfloat16"), topology="v5e:2x2")
    assert (2 * n + 12 * adapters) / CHIPS <= half.resident_state_bytes <= 2 * n + 12 * adapters
    assert plan.resident_state_bytes - half.resident_state_bytes >= 2 * n / CHIPS  # 2 of 4 bytes saved
    # lora_dropout: the step takes its key (compiled abstractly too); the keys add a few bytes
    drop = plan_sft(model, SFTConfig(batch_size=8, max_length=32, lora_rank=8, lora_dropout=0.1),
                    topology="v5e:2x2")
    assert drop.fits and 0 <= drop.resident_state_bytes - plan.resident_state_bytes <= 2 * L * 2 * 8


@pytest.mark.parametrize("trainer", ["rm", "sft"])
def test_plan_rm_and_sft_too_large_batch_is_exit_1(tmp_path, capsys, trainer):
    # a wide MLP: 1024 groups x 2 x 256 tokens (sft: 1024 x 256) of [tokens, 16384] float32
    # activations are 8-16 GiB per chip each, and the backward keeps several per layer
    model = _write(tmp_path, "wide", dict(TINY, intermediate_size=16384))
    rc = main(["plan", "--trainer", trainer, "--model", str(model), "--topology", "v5e:2x2",
               "--set", "batch_size=1024", "--set", "max_length=256"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "verdict: DOES NOT FIT" in out and "remat=full" in out and "Traceback" not in out + err
    assert "logprob_chunk" not in out  # a PPOConfig switch: not offered for RM / SFT


def test_plan_ppo_under_tensor_parallelism(tmp_path):
    """Every PPO program compiles with a tensor axis (fsdp=2 x tensor=2 on 4 chips): the weights
    are split over both axes and the programs that run the models move bytes between chips."""
    import jax

    from ppo_jax.plan import build_ppo_trainer, plan_trainer, topology_devices
    from ppo_rlhf import PPOConfig

    model = str(_write(tmp_path, "tiny", TINY))
    cfg = PPOConfig(batch_size=8, max_prompt_len=16, max_new_tokens=16)
    devices, hbm = topology_devices("v5e:2x2")
    trainer = build_ppo_trainer(model, model, cfg, devices=devices, mesh="fsdp=2,tensor=2")
    specs = [x.sharding.spec for x in jax.tree.leaves(trainer.resident_state())]
    assert sum("tensor" in spec for spec in specs) >= len(specs) // 2, specs
    plan = plan_trainer(trainer, topology="v5e:2x2", chips=CHIPS, hbm=hbm, batch_size=8)
    assert plan.mesh == "fsdp=2,tensor=2" and plan.fits
    progs = {p.name: p for p in plan.programs}
    assert set(progs) == {"generate", "rollout_forward", "advantages", "update"}
    assert all(p.error is None for p in progs.values())
    # the forwards' matmuls split over `tensor` leave partial sums: all-reduced; the weights'
    # fsdp shards are gathered where a layer runs
    for name in ("generate", "rollout_forward", "update"):
        coll = progs[name].collective_bytes
        assert coll.get("all-gather", 0) > 0 and coll.get("all-reduce", 0) > 0, (name, coll)
    # float32: policy + critic with AdamW moments, reference + reward model, split 4 ways (the
    # 1-D norms and biases only over fsdp): well under half of it per chip (fsdp=2 alone's share)
    n_lm, n_rm = qwen2_params(TINY), qwen2_params(TINY, scalar=True)
    total = 16 * (n_lm + n_rm)
    assert total / CHIPS <= plan.resident_state_bytes < 0.3 * total


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9:2x2"], "unknown topology"),
    (["--topology", "v5e:3x7"], "topology 'v5e:3x7'"),
    (["--topology", "v5e:2x2", "--set", "frozen_dtype=float16"], "frozen_dtype"),
    (["--topology", "v5e:2x2", "--mesh", "fsdp=3"], "mesh"),
    (["--topology", "v5e:2x2", "--trainer", "sft", "--reward-model", "rm/"], "--reward-model is for"),
    (["--topology", "v5e:2x2", "--trainer", "rm", "--set", "logprob_chunk=64"], "logprob_chunk"),
    (["--topology", "v5e:2x2", "--trainer", "sft", "--set", "batch_size=6"], "batch_size=6"),
])
def test_plan_bad_input_is_exit_2(tmp_path, capsys, args, message):
    model = _write(tmp_path, "tiny", TINY)
    assert main(["plan", "--model", str(model), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_plan_missing_config_is_exit_2(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nothing"), "--topology", "v5e:2x2"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_max_batch_size_bisection():
    from ppo_jax.plan import Plan, max_batch_size

    for limit in (0, 4, 12, 40, 44, 1000):
        seen = []

        def run(b, limit=limit):
            seen.append(b)
            return Plan("t", 1, 1, "", fits=b <= limit, batch_size=b)

        best, plan = max_batch_size(run, 4, 8)
        assert best == limit // 4 * 4, (limit, best, seen)
        assert (plan is None) == (best == 0)
        assert len(seen) <= 2 * max(limit // 4, 2).bit_length() + 2  # logarithmic


def test_abstract_trainer_matches_the_real_one(tiny_checkpoint):
    """The planned trainer is the real one built on abstract models: the same parameter tree,
    shapes, dtypes and shardings (on 1 CPU device here) as a trainer that loaded the weights."""
    import jax

    from ppo_jax.models import load_pretrained, load_scalar_model
    from ppo_jax.ppo import PPOTrainer
    from ppo_rlhf import PPOConfig

    lm = tiny_checkpoint("qwen2")
    rm = tiny_checkpoint("qwen2", kind="scalar", seed=1)
    cfg = PPOConfig(batch_size=2, max_prompt_len=4, max_new_tokens=4, frozen_dtype="bfloat16")
    real = PPOTrainer(str(lm), str(rm), config=cfg, mesh="fsdp=1", eos_token_id=None, pad_token_id=0)
    abstract = PPOTrainer(load_pretrained(lm, abstract=True), load_scalar_model(rm, abstract=True),
                          config=cfg, mesh="fsdp=1", eos_token_id=None, pad_token_id=0)

    def sig(tree):
        return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), x.sharding.spec), tree)

    assert sig(abstract.resident_state()) == sig(real.resident_state())
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.resident_state()))


def test_a_lora_critics_base_is_the_reward_models_in_the_plan(tiny_checkpoint):
    """A LoRA critic made from the reward model holds the reward model's arrays as its base
    (`critic_from_reward_model`): placed on a mesh they stay one array (`Placement.placer`), and
    the resident state counts them once -- in the real trainer and in the planned (abstract) one."""
    from ppo_jax.abstract import tree_nbytes
    from ppo_jax.models import load_pretrained, load_scalar_model
    from ppo_jax.ppo import PPOTrainer
    from ppo_rlhf import PPOConfig

    lm = tiny_checkpoint("qwen2")
    rm = tiny_checkpoint("qwen2", kind="scalar", seed=1)
    cfg = PPOConfig(batch_size=2, max_prompt_len=4, max_new_tokens=4, lora_rank=2,
                    lora_roles=("policy", "critic"))
    kw = dict(config=cfg, mesh="fsdp=1", eos_token_id=None, pad_token_id=0)
    real = PPOTrainer(str(lm), str(rm), **kw)
    abstract = PPOTrainer(load_pretrained(lm, abstract=True, options=cfg.model_options("policy")),
                          load_scalar_model(rm, abstract=True), **kw)
    for t in (real, abstract):
        state = t.resident_state()
        trunk = tree_nbytes(state["base"]["critic"])
        assert trunk > 0.9 * tree_nbytes(state["reward"])  # the critic's base: all but its head
        assert tree_nbytes(state) == tree_nbytes(state, unique=False) - trunk


@pytest.mark.parametrize("trainer", ["rm", "sft"])
def test_abstract_rm_and_sft_trainers_match_the_real_ones(tiny_checkpoint, trainer):
    """The planned RM / SFT trainer is the real one built on an abstract model: the same
    parameter and AdamW-state tree, shapes, dtypes and shardings (on 1 CPU device here)."""
    import jax

    from ppo_jax.models import load_pretrained
    from ppo_jax.reward_model import RewardModelTrainer, init_reward_model
    from ppo_jax.sft import SFTTrainer
    from ppo_rlhf import RMConfig, SFTConfig

    lm = tiny_checkpoint("qwen2")
    if trainer == "rm":
        cfg = RMConfig(batch_size=2, max_length=16)
        real = RewardModelTrainer(str(lm), cfg, mesh="fsdp=1")
        abstract = RewardModelTrainer(init_reward_model(lm, options=cfg.model_options(), abstract=True),
                                      cfg, mesh="fsdp=1")
    else:
        cfg = SFTConfig(batch_size=2, max_length=16)
        real = SFTTrainer(str(lm), cfg, mesh="fsdp=1")
        abstract = SFTTrainer(load_pretrained(lm, abstract=True), cfg, mesh="fsdp=1")

    def sig(tree):
        return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), x.sharding.spec), tree)

    assert sig(abstract.resident_state()) == sig(real.resident_state())
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.resident_state()))
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(real.resident_state()))


def test_tpu_plan_benchmark_smoke(tmp_path):
    """benchmarks.tpu_plan on a tiny shape: a row per planned batch (gradient accumulation from
    --micro-batch), the JSON and markdown written, keyed by --mesh."""
    from benchmarks import tpu_plan

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "plan.json"
    assert tpu_plan.main(["--models", "tiny", "--topologies", "v5e:2x2", "--settings", "best",
                          "--batches", "8", "--micro-batch", "4", "--length", "8",
                          "--mesh", "fsdp=2,tensor=2",
                          "--config-dir", str(tmp_path), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["plans"]
    assert [(r["batch_size"], r["grad_accum_steps"], r["fits"], r["mesh"]) for r in rows] == [
        (8, 2, True, "fsdp=2,tensor=2")]
    assert "| tiny | v5e:2x2 | fsdp=2,tensor=2 | best | 8 | 8 | 4 |" in out.with_suffix(".md").read_text()


def test_hlo_text_parsers():
    """Collective bytes and the largest values, read from HLO text as XLA prints it: an async
    collective counts once (its -done result; the -start tuple also holds the input)."""
    from ppo_jax.plan import collective_bytes, largest_values

    text = """
  %all-gather-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8]{1,0} %p), dimensions={0}
  %all-gather-done = f32[16,8]{1,0} all-gather-done((f32[4,8]{1,0}, f32[16,8]{1,0}) %all-gather-start)
  %ar.1 = bf16[10]{0} all-reduce(bf16[10]{0} %x), to_apply=%add
  %rs = (f32[2,2]{1,0}, f32[3]{0}) reduce-scatter(f32[8,2]{1,0} %a, f32[12]{0} %b), dimensions={0}
  %big = f32[64,1024]{1,0} fusion(f32[64]{0} %y), kind=kLoop, metadata={op_name="jit(f)/exp"}
  %p2 = f32[512,1024]{1,0} parameter(1)
"""
    assert collective_bytes(text) == {"all-gather": 16 * 8 * 4, "all-reduce": 10 * 2,
                                      "reduce-scatter": 4 * 4 + 3 * 4}
    top = largest_values(text, n=1)[0]
    assert top == {"bytes": 64 * 1024 * 4, "shape": [64, 1024], "dtype": "f32", "op": "fusion",
                   "from": "jit(f)/exp"}  # parameters are arguments, not values computed
