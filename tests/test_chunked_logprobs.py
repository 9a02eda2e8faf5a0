"""Chunked log-probs and entropies (`PPOConfig.logprob_chunk`, the `chunk=` keyword of
`response_logprobs` / `response_logprobs_and_values`) in both backends: the same values and
gradients as the unchunked path, and no [B, R, V] float32 logits in the computation.

Tolerances. Chunking changes no arithmetic of any one position (same LM head, same temperature,
same reductions over the vocabulary), only how the work is cut:
  * values: torch runs the same kernels on row slices, so a chunk covering the whole response
    is bit-identical; smaller chunks and every JAX chunk may round differently where the
    compiler fuses or blocks the [rows, H] x [H, V] matmul and the logsumexp differently: at
    most a few float32 ulps of |log-prob| <~ 10 (ulp 9.5e-7 in [8, 16)), observed <= 2.9e-6 on
    the entropy with chunk 1 -> 1e-5 absolute;
  * gradients: the LM head's weight gradient is a sum over positions, done in one matmul
    unchunked and as a sum of per-chunk matmuls chunked -- float32 reassociation, observed
    <= 9e-7 of each tensor's largest entry -> 1e-5 relative to it. In float64 (JAX) the same
    comparison agrees to 1e-12, which shows the differences are rounding and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_rlhf.testing import make_padded_batch

V = 512
B, P, R = 3, 5, 7
CHUNKS = (1, 3, 7, 16)  # 3 does not divide R (padding), 7 = R, 16 > R
ATOL = 1e-5
GRAD_RTOL = 1e-5


def _batch(seed=1):
    return make_padded_batch(seed, B, P, R, V)


def _weights():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, R)).astype(np.float32), rng.normal(size=(B, R)).astype(np.float32)


def _t(*xs):
    return tuple(torch.from_numpy(np.asarray(x)) for x in xs)


# ---- JAX -------------------------------------------------------------------------------------------
def _jax_value_and_grad(model, batch, chunk, shared=False):
    """(log-probs, entropy[, values]) and the gradients of a weighted sum of them."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w1, w2 = _weights()

    def f(params):
        m = nnx.merge(graphdef, params, rest)
        if shared:
            lp, values, ent = jm.response_logprobs_and_values(m, *batch, temperature=0.7,
                                                              return_entropy=True, chunk=chunk)
            out = (lp, ent, values)
        else:
            out = jm.response_logprobs(m, *batch, temperature=0.7, return_entropy=True, chunk=chunk)
        loss = jnp.sum(out[0] * w1) + jnp.sum(out[1] * w2) + sum(jnp.sum(o) for o in out[2:])
        return loss, out

    (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return [np.asarray(o) for o in out], [np.asarray(g) for g in jax.tree.leaves(grads)]


def _assert_grads_close(got, ref, rtol=GRAD_RTOL):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        scale = np.abs(r).max()
        assert scale > 0 or np.abs(g).max() == 0
        np.testing.assert_allclose(g, r, atol=rtol * scale, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied and untied LM heads
def test_jax_chunked_equals_unchunked(tiny_checkpoint, arch):
    model = jm.load_pretrained(tiny_checkpoint(arch))
    batch = _batch()
    ref, ref_grads = _jax_value_and_grad(model, batch, 0)
    for chunk in CHUNKS:
        out, grads = _jax_value_and_grad(model, batch, chunk)
        for o, r in zip(out, ref):
            np.testing.assert_allclose(o, r, atol=ATOL, rtol=0, err_msg=f"chunk={chunk}")
        assert (out[0][batch[3] == 0] == 0).all() and (out[1][batch[3] == 0] == 0).all()
        _assert_grads_close(grads, ref_grads)


def test_jax_chunked_shared_trunk(tiny_checkpoint):
    model = jm.load_pretrained(tiny_checkpoint("qwen2"), with_value_head=True, seed=3)
    batch = _batch(seed=2)
    ref, ref_grads = _jax_value_and_grad(model, batch, 0, shared=True)
    out, grads = _jax_value_and_grad(model, batch, 3, shared=True)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, atol=ATOL, rtol=0)
    _assert_grads_close(grads, ref_grads)


def test_jax_chunked_float64_agrees_to_rounding(tiny_checkpoint):
    """In float64 chunked and unchunked agree to 1e-12: the float32 differences are rounding."""
    with jax.enable_x64(True):
        model = jm.load_pretrained(tiny_checkpoint("llama"), dtype="float64")
        batch = _batch()
        ref, ref_grads = _jax_value_and_grad(model, batch, 0)
        out, grads = _jax_value_and_grad(model, batch, 3)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, atol=1e-12, rtol=0)
    _assert_grads_close(grads, ref_grads, rtol=1e-12)


def _shapes(jaxpr) -> list[tuple]:
    """The shapes of every value of a jaxpr, nested jaxprs (scan, map, checkpoint) included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _shapes(inner)
    return out


def test_jax_chunked_never_builds_full_logits(tiny_checkpoint):
    """Forward and backward of the chunked log-probs hold at most [B, chunk, V] logits: no
    value in the whole differentiated program has a vocabulary axis next to more than `chunk`
    positions (the unchunked program does: the check can fail)."""
    model = jm.load_pretrained(tiny_checkpoint("llama"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _batch()

    def biggest_logits(chunk):
        def f(params):
            lp, ent = jm.response_logprobs(nnx.merge(graphdef, params, rest), *batch,
                                           return_entropy=True, chunk=chunk)
            return jnp.sum(lp) + jnp.sum(ent)

        shapes = _shapes(jax.make_jaxpr(jax.grad(f))(params).jaxpr)
        # [..., rows, V] activations (len >= 3: not the [H, V] head kernel or its gradient)
        return max(int(np.prod(s[:-1])) for s in shapes if len(s) >= 3 and s[-1] == V)

    assert biggest_logits(0) >= B * R
    assert biggest_logits(2) <= B * 2


# ---- torch -----------------------------------------------------------------------------------------
def _torch_value_and_grad(model, batch, chunk, shared=False):
    model.zero_grad(set_to_none=True)
    w1, w2 = _t(*_weights())
    if shared:
        lp, values, ent = tm.response_logprobs_and_values(model, *_t(*batch), temperature=0.7,
                                                          return_entropy=True, chunk=chunk)
        out = (lp, ent, values)
    else:
        out = tm.response_logprobs(model, *_t(*batch), temperature=0.7, return_entropy=True,
                                   chunk=chunk)
    loss = (out[0] * w1).sum() + (out[1] * w2).sum() + sum(o.sum() for o in out[2:])
    loss.backward()
    return ([o.detach().numpy() for o in out],
            [p.grad.numpy().copy() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_torch_chunked_equals_unchunked(tiny_checkpoint, arch):
    model = tm.load_pretrained(tiny_checkpoint(arch))
    batch = _batch()
    ref, ref_grads = _torch_value_and_grad(model, batch, 0)
    for chunk in CHUNKS:
        out, grads = _torch_value_and_grad(model, batch, chunk)
        for o, r in zip(out, ref):
            if chunk >= R:  # one chunk: the very same kernels, bit for bit
                np.testing.assert_array_equal(o, r)
            np.testing.assert_allclose(o, r, atol=ATOL, rtol=0, err_msg=f"chunk={chunk}")
        _assert_grads_close(grads, ref_grads)


def test_torch_chunked_shared_trunk(tiny_checkpoint):
    model = tm.load_pretrained(tiny_checkpoint("qwen2"), with_value_head=True, seed=3)
    batch = _batch(seed=2)
    ref, ref_grads = _torch_value_and_grad(model, batch, 0, shared=True)
    out, grads = _torch_value_and_grad(model, batch, 3, shared=True)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, atol=ATOL, rtol=0)
    _assert_grads_close(grads, ref_grads)


def test_torch_chunked_saves_no_full_logits(tiny_checkpoint):
    """What autograd keeps for the backward: with chunking, no saved tensor has more than
    B * chunk rows of V columns (the checkpointed chunks save only their inputs); without, the
    full logits are saved (the check can fail)."""
    model = tm.load_pretrained(tiny_checkpoint("llama"))
    batch = _t(*_batch())

    def biggest_saved(chunk):
        rows = [0]

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == V:
                rows[0] = max(rows[0], t.numel() // V)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, ent = tm.response_logprobs(model, *batch, return_entropy=True, chunk=chunk)
            (lp.sum() + ent.sum()).backward()
        return rows[0]

    assert biggest_saved(0) >= B * R
    assert biggest_saved(2) <= B * 2


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bad_chunk_is_an_error(tiny_checkpoint, backend):
    m = jm if backend == "jax" else tm
    model = m.load_pretrained(tiny_checkpoint("gpt2"))
    batch = _batch() if backend == "jax" else _t(*_batch())
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="chunk"):
            m.response_logprobs(model, *batch, chunk=bad)


# ---- the trainers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_trainer_step_with_chunking(tiny_checkpoint, backend):
    """One PPO iteration with logprob_chunk=4 (max_new_tokens 6: one padded chunk) gives the
    stats of the unchunked iteration, up to float32 rounding."""
    from tests.helpers import make_trainer

    path = tiny_checkpoint("llama")
    stats = [make_trainer(backend, path, logprob_chunk=c).step(0) for c in (0, 4)]
    for k, v in stats[0].items():
        if isinstance(v, float) and not k.startswith("time/"):
            np.testing.assert_allclose(stats[1][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
