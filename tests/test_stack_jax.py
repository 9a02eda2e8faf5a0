"""Stacked, scanned layers (`ppo_jax.models.stack`), activation checkpointing and the attention
kernel of the JAX models. Logits against transformers: parity_tests/test_models_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ppo_jax.models as jm
from ppo_jax.models import layers, stack
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError
from ppo_rlhf.testing import make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512
DEPTH_KEY = {"gpt2": "n_layer", "llama": "num_hidden_layers", "qwen2": "num_hidden_layers",
             "gpt_neox": "num_hidden_layers"}
# one projection per architecture: (HF module inside a layer, our path inside the stack, transposed?)
PROJECTION = {"gpt2": ("attn.c_attn", ("attn", "c_attn"), False),
              "llama": ("self_attn.q_proj", ("self_attn", "q_proj"), True),
              "qwen2": ("mlp.down_proj", ("mlp", "down_proj"), True),
              "gpt_neox": ("attention.query_key_value", ("attention", "query_key_value"), True)}


def _checkpoint(tiny_checkpoint, arch, layers=3, **kw):
    return tiny_checkpoint(arch, **{DEPTH_KEY[arch]: layers}, **kw)


def _blocks(model) -> stack.ScannedBlocks:
    backbone = model.backbone
    return backbone.h if backbone.config.model_type == "gpt2" else backbone.layers


def _batch(seed=0, B=3, P=7, R=5):
    q, qm, r, rm = make_padded_batch(seed, B, P, R, V)
    return q, qm, r, rm, np.concatenate([q, r], 1), np.concatenate([qm, rm], 1)


# ---- loading and saving: HF's per-layer tensors are slices of the stacked arrays ------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_layers_are_slices_of_the_stacked_parameters(tiny_checkpoint, tmp_path, arch):
    src = _checkpoint(tiny_checkpoint, arch, shard=True)  # 3 layers, several safetensors files
    assert len(hfc.weight_files(src)) > 1
    tensors = hfc.load_tensors(src)
    lm = jm.load_pretrained(src)
    blocks = _blocks(lm)
    assert isinstance(blocks, stack.ScannedBlocks) and blocks.num_layers == 3
    hf_module, ours, transposed = PROJECTION[arch]
    prefix = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(arch, "model.layers")
    kernel = np.asarray(getattr(getattr(blocks.stack, ours[0]), ours[1]).kernel[...])
    assert kernel.shape[0] == 3
    for i in range(3):  # slice i is layer i (in order, transposed from HF's [out, in] where needed)
        hf = tensors[f"{prefix}.{i}.{hf_module}.weight"]
        np.testing.assert_array_equal(kernel[i], hf.T if transposed else hf)
    assert np.abs(kernel[0] - kernel[1]).max() > 0  # the layers differ: the order is checked

    # model_tensors: every checkpoint tensor back, one per layer, unstacked, bit for bit
    mine = jm.model_tensors(lm)
    assert set(mine) == {k for k in tensors if not k.endswith(hfc.IGNORED_SUFFIXES)}
    for k, v in mine.items():
        assert v.shape == tensors[k].shape, k
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)

    # saved sharded and loaded back: the same stacked arrays
    out = jm.save_pretrained(lm, tmp_path / "out", max_shard_bytes=60_000)
    assert len(hfc.weight_files(out)) > 1
    back = jm.load_pretrained(out)
    for (path, a), (path_b, b) in zip(nnx.to_flat_state(nnx.state(lm, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(back, nnx.Param))):
        assert path == path_b
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

    # one layer's tensor missing: named in the error
    gone = f"{prefix}.2.{hf_module}.weight"
    hfc.save_tensors(tmp_path / "gap", {k: v for k, v in tensors.items() if k != gone})
    hfc.write_config(tmp_path / "gap", hfc.read_config(src))
    with pytest.raises(CheckpointError, match=rf"missing tensor.*{gone}"):
        jm.load_pretrained(tmp_path / "gap")


def test_one_layer_of_the_wrong_shape_is_named(tiny_checkpoint, tmp_path):
    src = _checkpoint(tiny_checkpoint, "llama")
    tensors = hfc.load_tensors(src)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    hfc.save_tensors(tmp_path, tensors)
    hfc.write_config(tmp_path, hfc.read_config(src))
    with pytest.raises(CheckpointError, match=rf"{name}.*has shape \(64, 127\) \(transposed\)"):
        jm.load_pretrained(tmp_path)


# ---- the scan equals a loop over the layers ----------------------------------------------------------
def _unrolled(self, x, *args, per_layer=(), cache=None, cache_index=None):
    """`ScannedBlocks.__call__` as a plain Python loop over the same stacked parameters (the
    reference: the contract of the stack module's docstring, written out)."""
    graphdef, params = nnx.split(self.stack)
    for i in range(self.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))
        view = None if cache is None else layers.LayerCache(cache, jnp.int32(i))
        x, view = block(x, *args, *(jnp.asarray(a)[i] for a in per_layer), view, cache_index)
        cache = None if view is None else view.cache
    return x, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_equals_a_loop_over_the_layers(tiny_checkpoint, monkeypatch, arch):
    """Full forward and a prefill + decode with the stacked KV cache: the scanned model gives the
    logits (and cache) of a Python loop over the same parameters."""
    kw = {"scale_attn_by_inverse_layer_idx": True} if arch == "gpt2" else {}  # per-layer input
    lm = jm.load_pretrained(_checkpoint(tiny_checkpoint, arch, **kw))
    q, qm, r, rm, ids, mask = _batch(seed=1)
    B, P = q.shape

    def run():
        full = lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        kv = np.concatenate([qm, np.zeros((B, 2), np.int32)], 1)
        pre, cache = lm(jnp.asarray(q), attention_mask=jnp.asarray(kv),
                        cache=lm.init_cache(B, P + 2), cache_index=0)
        kv[:, P] = 1
        dec, cache = lm(jnp.asarray(r[:, :1]), attention_mask=jnp.asarray(kv), cache=cache,
                        cache_index=P)
        return [np.asarray(a) for a in (full, pre, dec, cache.k, cache.v)]

    scanned = run()
    looped_lm = lm
    lm = jm.rebuild(lm, options=ModelOptions(scan_unroll=True))
    unrolled = run()
    lm = looped_lm
    monkeypatch.setattr(stack.ScannedBlocks, "__call__", _unrolled)
    looped = run()
    real = mask == 1
    # the loop runs op by op, the scan as one compiled body: float32 rounding differs (observed
    # ~1.4e-6 on logits of ~1.4); a wrong layer order or cache slot moves them by > 1e-2
    for name, got in (("scan", scanned), ("scan_unroll", unrolled)):
        np.testing.assert_allclose(got[0][real], looped[0][real], atol=1e-5, rtol=0, err_msg=name)
        for a, b in zip(got[1:], looped[1:]):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
    k = scanned[3]
    assert k.shape[0] == 3 and np.abs(k[2]).max() > 0  # every layer's slots were written


def test_scan_unroll_takes_the_loop_out_of_the_program(tiny_checkpoint):
    """ModelOptions(scan_unroll=True): the lowered forward has no while loop and grows with depth
    (the trade it makes); False (the default) keeps one loop whose body does not grow."""
    _, _, _, _, ids, mask = _batch(seed=3)
    ops = {}
    for depth in (2, 4):
        lm = jm.load_pretrained(_checkpoint(tiny_checkpoint, "llama", layers=depth))
        assert all(not b.unroll for _, b in nnx.iter_graph(lm) if isinstance(b, stack.ScannedBlocks))
        for unroll in (False, True):
            graphdef, state = nnx.split(jm.rebuild(lm, options=ModelOptions(scan_unroll=unroll)))
            text = jax.jit(lambda s: nnx.merge(graphdef, s)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
                           ).lower(state).as_text()
            ops[depth, unroll] = ("stablehlo.while" in text, len(text.splitlines()))
    assert ops[2, False][0] and ops[4, False][0] and ops[2, False][1] == ops[4, False][1]
    assert not ops[2, True][0] and not ops[4, True][0] and ops[4, True][1] > ops[2, True][1]
    with pytest.raises(ValueError, match="scan_unroll=1 is invalid"):
        ModelOptions(scan_unroll=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_program_does_not_grow_with_depth(tiny_checkpoint, arch):
    """The lowered XLA programs of the forward's gradient and of a cached decode step have the
    same number of operations at 2 and 5 layers: the block is in the program once, whatever the
    depth (compile time independent of depth; measured by benchmarks/compile_depth.py). A Python
    loop over the layers, or a fully unrolled scan, fails this."""
    q, qm, r, rm, ids, mask = _batch(seed=2)
    sizes = {}
    for depth in (2, 5):
        lm = jm.load_pretrained(_checkpoint(tiny_checkpoint, arch, layers=depth))
        graphdef, state = nnx.split(lm)

        def loss(state):
            return jm.response_logprobs(nnx.merge(graphdef, state), q, qm, r, rm).sum()

        def decode(state, cache):
            kv = jnp.ones((ids.shape[0], cache.k.shape[3]), jnp.int32)
            return nnx.merge(graphdef, state)(jnp.asarray(ids[:, :1]), attention_mask=kv,
                                              cache=cache, cache_index=3)

        cache = lm.init_cache(ids.shape[0], 8)
        assert cache.k.shape[0] == depth
        sizes[depth] = tuple(len(jax.jit(f).lower(*args).as_text().splitlines())
                             for f, args in ((jax.grad(loss), (state,)), (decode, (state, cache))))
    assert sizes[2] == sizes[5], sizes


def test_rm_and_sft_trainers_apply_scan_unroll(tiny_checkpoint):
    from ppo_jax.reward_model import RewardModelTrainer
    from ppo_jax.sft import SFTTrainer
    from ppo_rlhf.config import RMConfig, SFTConfig

    path = str(_checkpoint(tiny_checkpoint, "gpt2"))
    for unroll in (True, False):
        models = (SFTTrainer(path, SFTConfig(scan_unroll=unroll)).model(),
                  RewardModelTrainer(path, RMConfig(scan_unroll=unroll)).model())
        for model in models:
            blocks = [b for _, b in nnx.iter_graph(model) if isinstance(b, stack.ScannedBlocks)]
            assert blocks and all(b.unroll is unroll for b in blocks), type(model).__name__


# ---- activation checkpointing -----------------------------------------------------------------------
def _grads_and_memory(path, remat, dtype, data):
    q, qm, r, rm = data
    lm = jm.load_pretrained(path, dtype=dtype, options=ModelOptions(remat=remat))
    assert all(b.remat == remat for _, b in nnx.iter_graph(lm) if isinstance(b, stack.ScannedBlocks))
    graphdef, state = nnx.split(lm)
    fn = jax.jit(jax.grad(lambda s: jm.response_logprobs(nnx.merge(graphdef, s), q, qm, r, rm,
                                                         temperature=0.7).sum()))
    memory = fn.lower(state).compile().memory_analysis()
    grads = jm.model_tensors(nnx.merge(graphdef, fn(state)))
    return grads, None if memory is None else memory.temp_size_in_bytes


@pytest.mark.parametrize("arch", ARCHS)
def test_remat_gives_the_same_gradients_with_less_memory(tiny_checkpoint, arch):
    """remat "full" / "dots" recompute the forward in the backward: the gradients are those
    without remat -- up to float32 rounding, because XLA fuses the recomputed forward with the
    backward and may round differently (observed: GPT-2 and GPT-NeoX bit-identical, Llama's
    SwiGLU 1.3e-6 of a tensor's largest gradient; 2e-15 in float64) -- while the backward's
    temporary memory shrinks: none > dots (keeps the projections' outputs) > full."""
    path = _checkpoint(tiny_checkpoint, arch, layers=4)
    data = make_padded_batch(3, 8, 24, 24, V)[:4]
    base, mem_none = _grads_and_memory(path, "none", "float32", data)
    mems = {"none": mem_none}
    for remat in ("full", "dots"):
        grads, mems[remat] = _grads_and_memory(path, remat, "float32", data)
        for k, g in base.items():
            np.testing.assert_allclose(grads[k], g, atol=1e-5 * np.abs(g).max(), rtol=0,
                                       err_msg=f"{remat}: {k}")
    assert max(np.abs(g).max() for g in base.values()) > 1e-2
    if mem_none is not None:  # XLA reports the compiled program's temporary buffers
        assert mems["none"] > mems["dots"] > mems["full"], mems


def test_remat_gradients_in_float64(tiny_checkpoint):
    path = _checkpoint(tiny_checkpoint, "llama")
    data = make_padded_batch(4, 3, 7, 5, V)[:4]
    with jax.enable_x64(True):
        base, _ = _grads_and_memory(path, "none", "float64", data)
        for remat in ("full", "dots"):
            grads, _ = _grads_and_memory(path, remat, "float64", data)
            for k, g in base.items():
                np.testing.assert_allclose(grads[k], g, atol=1e-12 * np.abs(g).max(), rtol=0, err_msg=k)


def test_remat_policy_names(tiny_checkpoint):
    lm = jm.load_pretrained(tiny_checkpoint("gpt2"))
    assert lm.backbone.h.remat == "none" and set(jm.REMAT_POLICIES) == {"none", "full", "dots"}
    with pytest.raises(ValueError, match="remat='some'.*'none', 'full', 'dots'"):
        ModelOptions(remat="some")
    # static: part of the graphdef (a trainer's programs are specialised on it)
    dots = jm.rebuild(lm, options=ModelOptions(remat="dots"))
    assert nnx.split(dots)[0] != nnx.split(lm)[0]
    assert dots.backbone.h.remat == "dots" and lm.backbone.h.remat == "none"  # lm is unchanged


# ---- attention ---------------------------------------------------------------------------------------
def test_attention_kernel_masks_and_empty_rows():
    """`layers.dot_product_attention` (jax.nn.dot_product_attention) against the written-out
    float64-path math, with grouped-query heads; a query with no key at all gets a uniform
    average of the values, not NaN; bfloat16 inputs keep float32 scores and softmax."""
    rng = np.random.default_rng(0)
    B, S, T, nh, nkv, D = 2, 5, 7, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, S, nh, D), (B, T, nkv, D), (B, T, nkv, D)])
    mask = jnp.asarray(rng.random((B, S, T)) < 0.6).at[1, 2].set(False)
    out = layers.dot_product_attention(q, k, v, mask, 0.3)
    ref = layers._attention_wide(q, k, v, mask, 0.3)
    assert out.shape == (B, S, nh, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6, rtol=0)
    # the empty row: uniform over all T keys of its KV head (head h reads KV head h // 2)
    expected = np.repeat(np.asarray(v)[1].mean(0), nh // nkv, axis=0)
    np.testing.assert_allclose(np.asarray(out)[1, 2], expected, atol=1e-6)
    # the mask is applied: attending everything differs
    everything = layers.dot_product_attention(q, k, v, jnp.ones_like(mask), 0.3)
    assert np.abs(np.asarray(everything) - np.asarray(out)).max() > 1e-2
    # bfloat16: the result is bf16, computed from float32 scores (within bf16 rounding of float32)
    bf = layers.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask, 0.3)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), np.asarray(out), atol=0.05)


def test_ppo_trainer_with_remat_compiles_once_and_steps_alike(tiny_checkpoint):
    """The JAX PPO trainer with PPOConfig(remat="dots", scan_unroll=True) (the policy and critic
    models carry the remat policy, every model the unrolled scan): nothing recompiles after the
    first iteration, and the iteration's stats and updated weights are those of the trainer
    with neither."""
    from ppo_jax.ppo import PPOTrainer
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.testing import EOS_ID, PAD_ID, count_jax_compilations

    ckpt = tiny_checkpoint("gpt2")
    config = PPOConfig(batch_size=4, max_prompt_len=6, max_new_tokens=5, ppo_epochs=2,
                       num_minibatches=2, learning_rate=1e-3)

    def trainer(remat):
        return PPOTrainer(str(ckpt), lambda p, r: [0.1 * len(x) for x in r],
                          config=config.replace(remat=remat, scan_unroll=remat != "none"),
                          eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    plain, remat = trainer("none"), trainer("dots")
    assert nnx.split(remat.policy_model())[0] != nnx.split(plain.policy_model())[0]
    for t, unroll in ((plain, False), (remat, True)):  # policy, reference and critic alike
        for model in (t.policy_model(), t.reference.model(), t.critic_model()):
            blocks = [b for _, b in nnx.iter_graph(model) if isinstance(b, stack.ScannedBlocks)]
            assert blocks and all(b.unroll == unroll for b in blocks)
    q, qm, _, _ = make_padded_batch(0, 4, 6, 1, V)
    s_plain = plain.step(0, query_ids=q, query_mask=qm)
    with count_jax_compilations() as first:
        s_remat = remat.step(0, query_ids=q, query_mask=qm)
    assert first  # its own programs: the remat policy is part of the graphdef
    for k, v in s_plain.items():
        if not k.startswith("time/"):
            np.testing.assert_allclose(s_remat[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    w_plain, w_remat = jm.model_tensors(plain.policy_model()), jm.model_tensors(remat.policy_model())
    start = jm.model_tensors(jm.load_pretrained(ckpt))
    assert max(np.abs(w_plain[k] - start[k]).max() for k in start) > 1e-4  # the update moved them
    for k in w_plain:  # AdamW turns rounding into lr * (relative error): see test_parallel_jax.py
        np.testing.assert_allclose(w_remat[k], w_plain[k], atol=5e-6, rtol=0, err_msg=k)
    with count_jax_compilations() as later:
        remat.step(1, query_ids=q, query_mask=qm)
    assert later == []
