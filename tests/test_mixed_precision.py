"""Mixed precision (`PPOConfig.compute_dtype`, `ModelOptions.compute_dtype`) in each backend: float32
weights, optimiser state and gradients with bfloat16 compute; float32 logits and log-probs.
Cross-backend agreement and its tolerance: parity_tests/test_precision_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_rlhf.config import ModelOptions, PPOConfig
from ppo_rlhf.testing import make_padded_batch
from tests.helpers import make_trainer

BF16 = ModelOptions(compute_dtype="bfloat16")


def test_config_fields():
    assert PPOConfig().compute_dtype is None and PPOConfig().logprob_chunk == 0
    cfg = PPOConfig(compute_dtype="bfloat16", logprob_chunk=64)
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(compute_dtype="int8"), dict(compute_dtype="float64"), dict(logprob_chunk=-1),
                dict(logprob_chunk=2.5), dict(logprob_chunk=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PPOConfig(**bad)
    with pytest.raises(ValueError, match="ModelOptions.compute_dtype='int8' is invalid"):
        ModelOptions(compute_dtype="int8")


def test_jax_bf16_compute_keeps_float32_weights_and_gradients(tiny_checkpoint):
    model = jm.load_pretrained(tiny_checkpoint("llama"), options=BF16)
    assert model.config.compute_dtype == "bfloat16"
    assert model.backbone.layers.stack.self_attn.q_proj.dtype == jnp.bfloat16
    assert model.init_cache(1, 4).k.dtype == jnp.bfloat16  # the cache holds bf16 keys / values
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    q, qm, r, rm = make_padded_batch(0, 2, 5, 4, 512)

    def f(params):
        return jnp.sum(jm.response_logprobs(nnx.merge(graphdef, params, rest), q, qm, r, rm))

    loss, grads = jax.value_and_grad(f)(params)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    # the logits are float32 and differ from the float32 model's by bf16 rounding only
    ids = jnp.concatenate([q, r], 1)
    logits, (hidden, _) = model(ids), model.hidden_states(ids)
    assert hidden.dtype == jnp.float32  # the residual stream and the norms stay float32
    model32 = jm.rebuild(model, options=ModelOptions())  # the same weights, float32 compute
    assert jm.model_options(model).compute_dtype == "bfloat16"  # the bf16 model is unchanged
    ref, (ref_hidden, _) = model32(ids), model32.hidden_states(ids)
    assert logits.dtype == jnp.float32
    assert 1e-4 < float(jnp.abs(logits - ref).max()) < 0.1
    assert float(jnp.abs(hidden - ref_hidden).max()) > 1e-3  # the backbone computed in bf16


def test_torch_bf16_compute_keeps_float32_weights_and_gradients(tiny_checkpoint):
    model = tm.load_pretrained(tiny_checkpoint("llama"), options=BF16)
    assert model.compute_dtype == torch.bfloat16
    q, qm, r, rm = (torch.from_numpy(x) for x in make_padded_batch(0, 2, 5, 4, 512))
    loss = tm.response_logprobs(model, q, qm, r, rm).sum()
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    ids = torch.cat([q, r], 1)
    with torch.no_grad():
        logits, (hidden, _) = model(ids), model.hidden_states(ids)
        model32 = tm.rebuild(model, options=ModelOptions())  # the same weights, float32 compute
        assert tm.model_options(model).compute_dtype == "bfloat16"  # the bf16 model is unchanged
        ref, (ref_hidden, _) = model32(ids), model32.hidden_states(ids)
    assert logits.dtype == torch.float32 and hidden.dtype == torch.float32
    assert 1e-4 < float((logits - ref).abs().max()) < 0.1
    assert float((hidden - ref_hidden).abs().max()) > 1e-3  # the backbone ran under autocast


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_trainer_with_bf16_compute(tiny_checkpoint, backend):
    """A PPO iteration with compute_dtype="bfloat16" (and chunked log-probs): float32 weights
    and AdamW state after the update, finite stats, no skipped step, and every role (reference
    included) computing in bf16."""
    path = tiny_checkpoint("llama")
    trainer = make_trainer(backend, path, compute_dtype="bfloat16", logprob_chunk=4, ppo_epochs=1,
                           num_minibatches=1)
    stats = trainer.step(0)
    assert all(np.isfinite(v) for k, v in stats.items() if isinstance(v, float))
    assert stats["update/skipped"] == 0
    if backend == "jax":
        leaves = jax.tree.leaves((trainer.params, trainer.opt_state))
        assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("float32")}
        assert trainer.policy_model().config.compute_dtype == "bfloat16"
    else:
        assert {p.dtype for p in trainer._trainable()} == {torch.float32}
        state = [t for s in trainer.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0]
        assert state and {t.dtype for t in state} == {torch.float32}
        assert trainer.policy.compute_dtype == torch.bfloat16
        assert trainer.reference.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_train_cli_flags(backend):
    """--compute-dtype and --logprob-chunk reach PPOConfig."""
    import argparse

    from ppo_rlhf.app.train import add_train_parser, build_config

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--backend", backend, "--policy", "p", "--reward-fn", "m:f",
                              "--prompts", "x", "--out", "o", "--compute-dtype", "bfloat16",
                              "--logprob-chunk", "16"])
    config = build_config(args, compute_dtype=args.compute_dtype, logprob_chunk=args.logprob_chunk)
    assert config.compute_dtype == "bfloat16" and config.logprob_chunk == 16


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["rm", "sft"])
def test_rm_and_sft_trainers_with_bf16_compute(tiny_checkpoint, backend, kind):
    """RMConfig / SFTConfig.compute_dtype: one training step, float32 weights, finite loss, and
    a loss that differs from the float32 trainer's by bf16 rounding only."""
    import importlib

    from transformers import AutoTokenizer

    from ppo_rlhf.config import RMConfig, SFTConfig
    from ppo_rlhf.data import PairwiseRecord
    from ppo_rlhf.data.encoding import encode_preferences, encode_sft

    ckpt = tiny_checkpoint("llama")
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    losses = {}
    for cd in (None, "bfloat16"):
        if kind == "rm":
            config = RMConfig(batch_size=2, max_length=16, compute_dtype=cd)
            trainer = importlib.import_module(f"ppo_{backend}.reward_model").RewardModelTrainer(str(ckpt), config)
            recs = [PairwiseRecord("a b", " good c", " bad d e"), PairwiseRecord("f", " g h", " i")]
            batch = encode_preferences(recs, tok, config).batch(np.arange(2))
        else:
            config = SFTConfig(batch_size=2, max_length=16, compute_dtype=cd)
            trainer = importlib.import_module(f"ppo_{backend}.sft").SFTTrainer(str(ckpt), config)
            batch = encode_sft(["a b c d e f", ("g h", " i j k")], tok, config).batch(np.arange(2))
        trainer._init_optimizer(1)
        losses[cd] = float(trainer._train_step(batch, 1e-3)["loss"])
        if backend == "jax":
            assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype("float32")}
        else:
            assert {p.dtype for p in trainer._model.parameters()} == {torch.float32}
    assert np.isfinite(losses["bfloat16"])
    assert 0 < abs(losses["bfloat16"] - losses[None]) < 0.05 * max(1.0, abs(losses[None]))


def _jaxpr_equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scan, remat, pjit, ...) included."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(sub, ClosedJaxpr):
                    yield from _jaxpr_equations(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    yield from _jaxpr_equations(sub)


def _low_precision_statistics(jaxpr) -> list[str]:
    """The statistics a bf16 model must not compute in bf16: an `rsqrt` (the norms'), or a
    reduction over the feature (last) axis -- a norm's mean / variance, a softmax's max and sum.
    Reductions over the batch and sequence axes (a bias's gradient) are the matmuls' kind of
    bf16 arithmetic and allowed."""
    found = []
    for e in _jaxpr_equations(jaxpr):
        x = e.invars[0] if e.invars else None
        if getattr(getattr(x, "aval", None), "dtype", None) != jnp.bfloat16:
            continue
        axes = tuple(int(a) for a in e.params.get("axes", ()))
        if e.primitive.name == "rsqrt" or (e.primitive.name.startswith(("reduce_", "argm"))
                                           and len(x.aval.shape) - 1 in axes):
            found.append(f"{e.primitive.name} {x.aval.dtype}{list(x.aval.shape)} axes={axes}")
    return found


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])  # RMSNorm, LayerNorm
def test_jax_bf16_norm_and_softmax_statistics_are_float32(tiny_checkpoint, arch):
    """Structural: in the jaxpr of the gradient of bf16-compute log-probs, no norm statistic or
    softmax reduction is computed in bf16. (Computing the norms' statistics in bf16 moves
    bf16 log-probs by only ~0.01 nats, under every numeric bound of the precision tests; this
    test sees it. Guard: the same check on the model's float32 jaxpr cast to bf16 finds them.)"""
    model = jm.load_pretrained(tiny_checkpoint(arch), options=BF16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    q, qm, r, rm = make_padded_batch(0, 2, 5, 4, 512)

    def loss(params):
        return jm.response_logprobs(nnx.merge(graphdef, params, rest), q, qm, r, rm).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert _low_precision_statistics(jaxpr) == []
    # the guard: a norm written without the upcast is found (jnp.mean sums bf16 in float32 by
    # itself, then rounds the mean to bf16: the rsqrt on it is what shows)
    no_upcast = jax.make_jaxpr(lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True)))(
        jnp.ones((2, 8), jnp.bfloat16)).jaxpr
    assert _low_precision_statistics(no_upcast) == ["rsqrt bfloat16[2, 1] axes=()"]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_torch_bf16_norm_and_softmax_statistics_are_float32(tiny_checkpoint, arch):
    """The torch twin, on the ops autograd dispatches (forward and backward) under bf16
    autocast: no rsqrt, layer norm, or reduction over the last axis on a bf16 tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []
    reductions = {"mean", "sum", "amax", "var", "_softmax", "_log_softmax", "logsumexp"}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
                if name in ("rsqrt", "native_layer_norm"):
                    found.append(f"{name} {list(x.shape)}")
                elif name in reductions:
                    dims = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
                    dims = [dims] if isinstance(dims, int) else list(dims or range(x.dim()))
                    if any(d in (-1, x.dim() - 1) for d in dims):
                        found.append(f"{name} {list(x.shape)}")
            return func(*args, **(kwargs or {}))

    model = tm.load_pretrained(tiny_checkpoint(arch), options=BF16)
    q, qm, r, rm = (torch.from_numpy(x) for x in make_padded_batch(0, 2, 5, 4, 512))
    with Record():
        tm.response_logprobs(model, q, qm, r, rm).sum().backward()
    assert found == []
    with Record():  # the guard: the same statistics taken in bf16 are seen
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    assert len(found) == 2
