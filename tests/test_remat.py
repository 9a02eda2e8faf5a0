"""Activation checkpointing (`remat`: "none" | "full" | "dots") wired end to end: the field of
`PPOConfig` / `RMConfig` / `SFTConfig`, the `--remat` flag of `train`, `train-rm` and `pretrain`,
and the PPO, reward-model and SFT trainers of both backends, which apply it to the models they
differentiate (PPO: policy and critic, never the frozen reference or reward model).

Each trainer test checks two things against the same trainer with remat="none":
  * the recomputation happens. JAX: the jaxpr of the jitted step / update holds a remat
    (`jax.checkpoint`) equation with the policy's `jax.checkpoint_policies` entry, and none
    without remat. torch (`ppo_torch.models.remat`): counted while the step runs, the decoder
    layers' submodules are called again in the backward (full and dots), and the weight matmuls
    (aten.mm / aten.addmm) run again only under "full" ("dots" saved their outputs);
  * the result is the same. torch: bit-identical (the recomputation runs the same kernels on the
    same inputs). JAX: up to float32 rounding, because XLA fuses the recomputed forward with the
    backward differently (test_stack_jax.py measures ~1e-6 of a gradient's scale): losses and
    gradient norms at rtol 1e-5. Weights per tensor, in norm: AdamW's first step moves each
    weight by lr * g / (|g| + eps), ~lr * sign(g), so a rounding difference in a gradient entry
    near zero (|g| ~ eps) moves that one weight by up to ~lr (seen: 6.7e-6 at lr 1e-3, one entry
    of 8192, Llama's down_proj) while the rest agree to rounding; the difference of the two
    updated tensors must stay within 1e-3 of the update's norm.
"""

from __future__ import annotations

import collections
import contextlib
import json

import numpy as np
import pytest

from ppo_rlhf.app.cli import main
from ppo_rlhf.config import REMATS, ModelOptions, PPOConfig, RMConfig, SFTConfig
from ppo_rlhf.errors import UsageError
from ppo_rlhf.testing import make_padded_batch
from tests.helpers import make_trainer

POLICIES = ("full", "dots")
V = 512


# ---- the config field ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PPOConfig, RMConfig, SFTConfig])
def test_remat_field_is_validated_documented_and_round_trips(cls):
    assert cls().remat == "none" and REMATS == ("none", "full", "dots")
    with pytest.raises(ValueError, match=rf"{cls.__name__}.remat='some' is invalid: allowed one of "
                                         r"'none', 'full', 'dots'"):
        cls(remat="some")
    cfg = cls(remat="dots")
    again = cls.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.remat == "dots"
    # a config saved before the field existed (an older checkpoint's) loads with the default
    old = {k: v for k, v in cfg.to_dict().items() if k != "remat"}
    assert cls.from_dict(old).remat == "none"


@pytest.mark.parametrize("cls", [PPOConfig, RMConfig, SFTConfig])
def test_scan_unroll_field_is_validated_and_round_trips(cls):
    assert cls().scan_unroll is False
    with pytest.raises(ValueError, match=rf"{cls.__name__}.scan_unroll='yes' is invalid: allowed True or False"):
        cls(scan_unroll="yes")
    cfg = cls(scan_unroll=True)
    assert cls.from_dict(json.loads(cfg.to_json())) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "scan_unroll"}  # saved before the field
    assert cls.from_dict(old).scan_unroll is False


# ---- the CLI flags ---------------------------------------------------------------------------------
class _Stop(UsageError):
    pass


@pytest.mark.parametrize("flag", [["--remat", "dots", "--scan-unroll"], ["--set", "remat=full"], []])
def test_cli_train_remat_flag_reaches_the_ppo_config(monkeypatch, tmp_path, flag):
    import ppo_rlhf.app.train as train_cli

    seen = []
    build = train_cli.build_config

    def capture(args, **kw):
        seen.append(build(args, **kw))
        raise _Stop("stopped after the config")

    monkeypatch.setattr(train_cli, "build_config", capture)
    code = main(["train", "--backend", "torch", "--policy", str(tmp_path), "--reward-fn", "m:f",
                 "--prompts", "p.txt", "--out", str(tmp_path / "o"), *flag])
    assert code == 2 and len(seen) == 1
    assert seen[0].remat == {"--remat": "dots", "--set": "full"}.get(flag[0] if flag else "", "none")
    assert seen[0].scan_unroll is ("--scan-unroll" in flag)


@pytest.mark.parametrize("remat", [None, "full", "dots"])
def test_cli_train_rm_and_pretrain_remat_flag_reaches_their_configs(monkeypatch, tmp_path, remat):
    import ppo_rlhf.app.supervised as supervised_cli
    from ppo_rlhf.app import pipelines

    seen: dict = {}
    make = supervised_cli._config

    def capture_rm(cls, **values):
        seen["rm"] = make(cls, **values)
        raise _Stop("stopped after the config")

    def capture_sft(backend, out, *, config, **kw):
        seen["sft"] = SFTConfig(**config)
        raise _Stop("stopped after the config")

    monkeypatch.setattr(supervised_cli, "_config", capture_rm)
    monkeypatch.setattr(pipelines, "pretrain_model", capture_sft)
    flag = ([] if remat is None else ["--remat", remat]) + (["--scan-unroll"] if remat == "dots" else [])
    (tmp_path / "d.jsonl").write_text("")
    assert main(["train-rm", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"),
                 "--out", str(tmp_path / "rm"), *flag]) == 2
    assert main(["pretrain", "--out", str(tmp_path / "sft"), "--steps", "1", *flag]) == 2
    assert isinstance(seen["rm"], RMConfig) and seen["rm"].remat == (remat or "none")
    assert seen["sft"].remat == (remat or "none")
    assert seen["rm"].scan_unroll is seen["sft"].scan_unroll is (remat == "dots")


# ---- JAX: the remat equations of a step ------------------------------------------------------------
def _jax_remat_policies(fn, *args):
    """The `policy` of every remat (`jax.checkpoint`) equation in fn's jaxpr, nested ones too."""
    import jax

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name:
                found.append(eqn.params.get("policy"))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _assert_jax_remat(found, remat):
    from ppo_jax.models.stack import REMAT_POLICIES

    if remat == "none":
        assert found == [], found
    else:
        assert found and all(p == REMAT_POLICIES[remat] for p in found), (remat, found)


def _jax_blocks_remat(model):
    from flax import nnx

    from ppo_jax.models.stack import ScannedBlocks

    return {node.remat for _, node in nnx.iter_graph(model) if isinstance(node, ScannedBlocks)}


def _ppo_batch(B=4, P=8, R=6):
    q, qm, r, rm = make_padded_batch(3, B, P, R, V)
    rng = np.random.default_rng(1)
    def f():
        return (rng.normal(size=(B, R)) * rm).astype(np.float32)

    return {"query_ids": q, "query_mask": qm, "response_ids": r, "response_mask": rm,
            "logprobs": (-np.abs(f()) - 3.0 * rm).astype(np.float32), "values": f(),
            "advantages": f(), "returns": f()}


def _assert_stats_close(stats, base, exact):
    for k, v in base.items():
        if exact:
            np.testing.assert_array_equal(stats[k], v, err_msg=k)
        else:
            np.testing.assert_allclose(stats[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def _assert_weights_close(w, base, exact, start):
    """Weights after the step(s) equal `base`'s: exactly, or per tensor within 1e-3 of the norm
    of the update (`base - start`) -- see the module docstring for why not elementwise."""
    assert max(np.abs(base[k] - start[k]).max() for k in base) > 1e-4  # the step moved them
    for k in base:
        if exact:
            np.testing.assert_array_equal(w[k], base[k], err_msg=k)
        else:
            diff = np.linalg.norm(w[k] - base[k])
            assert diff <= 1e-3 * np.linalg.norm(base[k] - start[k]) + 1e-7, (k, diff)


@pytest.fixture(scope="module")
def jax_ppo_none(tiny_checkpoint):
    """The JAX PPO trainer without remat after one update on `_ppo_batch()`."""
    t = make_trainer("jax", tiny_checkpoint("gpt2"), learning_rate=1e-3)
    stats = t.update(_ppo_batch())
    return t, stats


def _jax_ppo_weights(t):
    import ppo_jax.models as jm

    return {**{"policy." + k: v for k, v in jm.model_tensors(t.policy_model()).items()},
            **{"critic." + k: v for k, v in jm.model_tensors(t.critic_model()).items()}}


@pytest.mark.parametrize("remat", POLICIES)
def test_jax_ppo_update_recomputes_and_updates_alike(tiny_checkpoint, jax_ppo_none, remat):
    import jax.numpy as jnp

    from ppo_rlhf.runtime import seeds

    ckpt = tiny_checkpoint("gpt2")
    base, base_stats = jax_ppo_none
    t = make_trainer("jax", ckpt, learning_rate=1e-3, remat=remat)
    # the differentiated models carry the policy; the frozen reference does not need it
    assert _jax_blocks_remat(t.policy_model()) == _jax_blocks_remat(t.critic_model()) == {remat}
    assert _jax_blocks_remat(t.reference.model()) == {"none"}
    batch = _ppo_batch()
    cfg = t.config
    rows = seeds.minibatch_indices(cfg.seed, 0, batch_size=cfg.batch_size,
                                   ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches)
    args = (t.params, t.opt_state, t.base, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(rows))
    _assert_jax_remat(_jax_remat_policies(t._update_impl, *args), remat)
    _assert_jax_remat(_jax_remat_policies(base._update_impl, *args), "none")
    stats = t.update(batch)
    _assert_stats_close(stats, base_stats, exact=False)
    start = _jax_ppo_weights(make_trainer("jax", ckpt, learning_rate=1e-3))
    _assert_weights_close(_jax_ppo_weights(t), _jax_ppo_weights(base), exact=False, start=start)


def _rm_batch(ckpt, config):
    from transformers import AutoTokenizer

    from ppo_rlhf.data import PairwiseRecord
    from ppo_rlhf.data.encoding import encode_preferences

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    recs = [PairwiseRecord("a b", " good c", " bad d e"), PairwiseRecord("f", " g h", " i"),
            PairwiseRecord("j k l", " m", " n o p"), PairwiseRecord("q", " r s", " t")]
    return encode_preferences(recs, tok, config).batch(np.arange(4))


def _sft_batch(ckpt, config):
    from transformers import AutoTokenizer

    from ppo_rlhf.data.encoding import encode_sft

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    data = encode_sft(["a b c d e f", ("g h", " i j k"), "l m n", ("o", " p q r s")], tok, config)
    return data.batch(np.arange(4))


def _supervised(backend, kind, ckpt, remat):
    """(trainer after _init_optimizer, its batch) of the RM or SFT trainer of `backend`."""
    import importlib

    if kind == "rm":
        config = RMConfig(batch_size=4, max_length=16, learning_rate=1e-3, remat=remat)
        module = importlib.import_module(f"ppo_{backend}.reward_model")
        trainer, batch = module.RewardModelTrainer(str(ckpt), config), _rm_batch(ckpt, config)
    else:
        config = SFTConfig(batch_size=4, max_length=16, learning_rate=1e-3, remat=remat)
        module = importlib.import_module(f"ppo_{backend}.sft")
        trainer, batch = module.SFTTrainer(str(ckpt), config), _sft_batch(ckpt, config)
    trainer._init_optimizer(1)
    return trainer, batch


def _jax_model_weights(trainer):
    import ppo_jax.models as jm

    return jm.model_tensors(trainer.model())


@pytest.mark.parametrize("kind,arch", [("rm", "gpt2"), ("sft", "llama")])
def test_jax_rm_and_sft_step_recomputes_and_steps_alike(tiny_checkpoint, kind, arch):
    import jax.numpy as jnp

    ckpt = tiny_checkpoint(arch)
    results = {}
    for remat in REMATS:
        t, batch = _supervised("jax", kind, ckpt, remat)
        assert _jax_blocks_remat(t.model()) == {remat}
        arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        _assert_jax_remat(_jax_remat_policies(t._step, t.params, t.opt_state, t._rest, arrays, 1e-3),
                          remat)
        start = _jax_model_weights(t)
        stats = t._train_step(batch, 1e-3)
        results[remat] = ({k: stats[k] for k in ("loss", "grad_norm")}, _jax_model_weights(t))
    base_stats, base_w = results["none"]
    for remat in POLICIES:
        _assert_stats_close(results[remat][0], base_stats, exact=False)
        _assert_weights_close(results[remat][1], base_w, exact=False, start=start)


# ---- torch: counting what runs ---------------------------------------------------------------------
@contextlib.contextmanager
def _torch_counts(models):
    """{"layer_calls": calls of submodules of the models' decoder layers, "matmuls": aten.mm +
    aten.addmm executions} while the block runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ppo_torch.models.remat import SAVED_OPS, decoder_layers

    counts = collections.Counter()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in SAVED_OPS:
                counts["matmuls"] += 1
            return func(*args, **(kwargs or {}))

    def hook(*_):
        counts["layer_calls"] += 1

    handles = [sub.register_forward_pre_hook(hook) for m in models for layer in decoder_layers(m)
               for sub in layer.children()]
    try:
        with Ops():
            yield counts
    finally:
        for h in handles:
            h.remove()


def _assert_torch_recomputed(counts, base, remat):
    if remat == "none":
        assert counts == base
        return
    assert counts["layer_calls"] > base["layer_calls"], (remat, counts, base)  # the layers ran again
    if remat == "full":
        assert counts["matmuls"] > base["matmuls"], (counts, base)   # ... the matmuls too
    else:
        assert counts["matmuls"] == base["matmuls"], (counts, base)  # saved: not recomputed


def _torch_weights(*models):
    return {f"{i}.{n}": p.detach().numpy().copy() for i, m in enumerate(models)
            for n, p in m.named_parameters()}


def test_torch_ppo_update_recomputes_and_updates_alike(tiny_checkpoint):
    from ppo_torch.models.remat import get_remat

    ckpt = tiny_checkpoint("gpt2")
    results = {}
    for remat in REMATS:
        t = make_trainer("torch", ckpt, learning_rate=1e-3, remat=remat)
        assert get_remat(t.policy) == get_remat(t.critic) == remat
        assert get_remat(t.reference) == "none"  # frozen: never differentiated
        start = _torch_weights(t.policy, t.critic)
        with _torch_counts([t.policy, t.critic]) as counts:
            stats = t.update(_ppo_batch())
        results[remat] = (dict(counts), stats, _torch_weights(t.policy, t.critic))
    base_counts, base_stats, base_w = results["none"]
    for remat in POLICIES:
        counts, stats, w = results[remat]
        _assert_torch_recomputed(counts, base_counts, remat)
        _assert_stats_close(stats, base_stats, exact=True)
        _assert_weights_close(w, base_w, exact=True, start=start)


@pytest.mark.parametrize("kind,arch", [("rm", "gpt2"), ("sft", "llama")])
def test_torch_rm_and_sft_step_recomputes_and_steps_alike(tiny_checkpoint, kind, arch):
    from ppo_torch.models.remat import get_remat

    ckpt = tiny_checkpoint(arch)
    results = {}
    for remat in REMATS:
        t, batch = _supervised("torch", kind, ckpt, remat)
        assert get_remat(t.model()) == remat
        start = _torch_weights(t.model())
        with _torch_counts([t.model()]) as counts:
            stats = t._train_step(batch, 1e-3)
        results[remat] = (dict(counts), {k: stats[k] for k in ("loss", "grad_norm")},
                          _torch_weights(t.model()))
    base_counts, base_stats, base_w = results["none"]
    for remat in POLICIES:
        counts, stats, w = results[remat]
        _assert_torch_recomputed(counts, base_counts, remat)
        _assert_stats_close(stats, base_stats, exact=True)
        _assert_weights_close(w, base_w, exact=True, start=start)


def test_torch_remat_is_off_without_gradients_and_with_a_kv_cache(tiny_checkpoint):
    """Scoring under no_grad and generation with a KV cache run the layers once, as without
    remat (a recomputation would write the cache twice); the same model rebuilt without remat
    has the class's forward again (and the model it came from keeps its own)."""
    import torch

    from ppo_torch.models import load_pretrained, rebuild
    from ppo_torch.models.remat import decoder_layers

    lm = load_pretrained(tiny_checkpoint("llama"), options=ModelOptions(remat="full"))
    ids = torch.as_tensor(make_padded_batch(0, 2, 6, 1, V)[0]).long()
    mask = torch.ones_like(ids)
    with torch.no_grad(), _torch_counts([lm]) as no_grad:
        lm(ids, mask)
    with _torch_counts([lm]) as cached:
        logits, _ = lm(ids, mask, use_cache=True)
        logits[:, -1].sum().backward()
    with _torch_counts([lm]) as plain:
        lm(ids, mask).sum().backward()
    assert no_grad["layer_calls"] == cached["layer_calls"] > 0
    assert plain["layer_calls"] > no_grad["layer_calls"]  # with gradients: recomputed
    plain_lm = rebuild(lm, options=ModelOptions())
    assert all("forward" not in vars(layer) for layer in decoder_layers(plain_lm))
    assert all("forward" in vars(layer) for layer in decoder_layers(lm))
    with _torch_counts([plain_lm]) as off:
        plain_lm(ids, mask).sum().backward()
    assert off["layer_calls"] == no_grad["layer_calls"]


@pytest.mark.parametrize("backend", ("jax", "torch"))
def test_resume_with_another_remat_continues_the_run(tiny_checkpoint, tmp_path, backend):
    """remat changes no state (parameters, optimiser, data order): a run checkpointed without it
    resumes with remat="dots" (and the run's train_config.json records the new value), and ends
    where an uninterrupted run without remat ends."""
    import importlib

    sft = importlib.import_module(f"ppo_{backend}.sft")
    ckpt = tiny_checkpoint("llama")
    texts = ["a b c d e f", "g h i", "j k l m", "n o", "p q r s t", "u v w"]
    base = {"batch_size": 2, "max_length": 12, "learning_rate": 1e-3, "lr_schedule": "constant"}
    straight = sft.SFTTrainer(str(ckpt), SFTConfig(**base, num_steps=3))
    straight.fit(texts, progress=False)
    out = tmp_path / "run"
    sft.SFTTrainer(str(ckpt), SFTConfig(**base, num_steps=2), out_dir=out,
                   checkpoint_every=2).fit(texts, progress=False)
    resumed = sft.SFTTrainer(str(ckpt), SFTConfig(**base, num_steps=3, remat="dots"), out_dir=out)
    resumed.fit(texts, progress=False, resume=True)
    assert [h["step"] for h in resumed.history] == [3]
    assert json.loads((out / "train_config.json").read_text())["remat"] == "dots"
    if backend == "jax":
        from ppo_jax.models import model_tensors
    else:
        from ppo_torch.models import model_tensors
    start = model_tensors(sft.SFTTrainer(str(ckpt), SFTConfig(**base)).model())
    _assert_weights_close(model_tensors(resumed.model()), model_tensors(straight.model()),
                          exact=backend == "torch", start=start)


def test_torch_scan_unroll_is_jax_only(tiny_checkpoint):
    """`ModelOptions.scan_unroll` is JAX's (a compile-time choice of the layer scan): a torch
    model built with it computes what it did (its layers are a Python loop), and a torch trainer
    configured with it takes a model built without it."""
    import torch

    from ppo_torch.models import load_pretrained

    path = tiny_checkpoint("gpt2")
    ids = torch.arange(1, 9).reshape(1, 8)
    assert torch.equal(load_pretrained(path, options=ModelOptions(scan_unroll=True))(ids),
                       load_pretrained(path)(ids))
    from ppo_torch.sft import SFTTrainer

    SFTTrainer(load_pretrained(path), SFTConfig(scan_unroll=True))  # no error
