"""Unit tests of what only ppo_jax.models has: the explicit KV cache, jitted decoding with a donated
cache, split / merge. Both cores' shared tests: tests/test_models.py; cross-backend equality:
parity_tests/test_models_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ppo_jax.models as jm
from ppo_jax.models.config import ModelConfig
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.testing import make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512


def _batch(seed=0, B=3, P=7, R=5):
    return make_padded_batch(seed, B, P, R, V)


def _full(q, qm, r, rm):
    return np.concatenate([q, r], 1), np.concatenate([qm, rm], 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_checkpoint, arch):
    lm = jm.load_pretrained(tiny_checkpoint(arch))
    q, qm, r, rm = _batch(seed=1)
    ids, mask = _full(q, qm, r, rm)
    B, P = q.shape
    R = r.shape[1]
    full = np.asarray(lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    cache = lm.init_cache(B, P + R)
    c = lm.config
    # one stacked, head-major array per k / v: [layers, B, kv heads, slots, head dim]
    assert cache.k.shape == cache.v.shape == (c.num_layers, B, c.num_kv_heads, P + R, c.head_dim)
    kv_mask = np.concatenate([qm, np.zeros_like(rm)], 1)
    logits, cache = lm(jnp.asarray(q), attention_mask=jnp.asarray(kv_mask), cache=cache, cache_index=0)
    steps = [np.asarray(logits)]
    for t in range(R):
        kv_mask[:, P + t] = rm[:, t]
        logits, cache = lm(jnp.asarray(r[:, t:t + 1]), attention_mask=jnp.asarray(kv_mask),
                           cache=cache, cache_index=P + t)
        assert logits.shape == (B, 1, V)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, 1)
    real = mask == 1
    np.testing.assert_allclose(inc[real], full[real], atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_jitted_scan_with_donation(tiny_checkpoint, arch):
    """The generation pattern: jitted prefill, then lax.scan over decode steps with a traced
    cache_index and a donated cache; equals the full forward."""
    lm = jm.load_pretrained(tiny_checkpoint(arch))
    graphdef, state = nnx.split(lm)
    q, qm, r, rm = _batch(seed=2)
    rm = np.ones_like(rm)  # every decode step is a real token here
    B, P = q.shape
    R = r.shape[1]
    ids, mask = _full(q, qm, r, rm)
    full = np.asarray(lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    @jax.jit
    def prefill(state, ids, kv_mask, cache):
        return nnx.merge(graphdef, state)(ids, attention_mask=kv_mask, cache=cache, cache_index=0,
                                          logits_to_keep=1)

    @jax.jit
    def decode(state, tokens, kv_mask, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, xs):
            cache, kv_mask = carry
            t, tok = xs
            kv_mask = kv_mask.at[:, P + t].set(1)
            logits, cache = model(tok[:, None], attention_mask=kv_mask, cache=cache, cache_index=P + t)
            return (cache, kv_mask), logits[:, 0]

        (cache, kv_mask), logits = jax.lax.scan(step, (cache, kv_mask), (jnp.arange(R), tokens.T))
        return jnp.swapaxes(logits, 0, 1), cache

    decode_donating = jax.jit(decode, donate_argnums=(3,))
    kv_mask = jnp.asarray(np.concatenate([qm, np.zeros_like(rm)], 1))
    last, cache = prefill(state, jnp.asarray(q), kv_mask, lm.init_cache(B, P + R))
    np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, P - 1], atol=1e-5)
    logits, cache = decode_donating(state, jnp.asarray(r), kv_mask, cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, P:], atol=1e-5)


def test_cache_argument_errors(tiny_checkpoint):
    lm = jm.load_pretrained(tiny_checkpoint("llama"))
    cache = lm.init_cache(2, 6)
    ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="does not fit"):
        lm(ids, attention_mask=jnp.ones((2, 6)), cache=cache, cache_index=4)
    with pytest.raises(ValueError, match="max_len"):
        lm(ids, attention_mask=jnp.ones((2, 3)), cache=cache, cache_index=0)
    with pytest.raises(ValueError, match="cache_index"):
        lm(ids, attention_mask=jnp.ones((2, 6)), cache=cache)
    gpt2 = jm.load_pretrained(tiny_checkpoint("gpt2"))
    with pytest.raises(ValueError, match="n_positions"):
        gpt2(jnp.ones((1, 1), jnp.int32), attention_mask=jnp.ones((1, 300)),
             cache=gpt2.init_cache(1, 300), cache_index=0)


def test_jit_split_merge_compiles_once(tiny_checkpoint):
    lm = jm.load_pretrained(tiny_checkpoint("qwen2"))
    graphdef, state = nnx.split(lm)

    @jax.jit
    def logits_fn(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    eager = np.asarray(lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(logits_fn(state, ids, mask)), eager, atol=1e-5)
    state2 = jax.tree.map(lambda x: x * 1.01, state)  # new weights, same shapes: no recompilation
    out2 = np.asarray(logits_fn(state2, ids, mask))
    assert np.abs(out2 - eager).max() > 1e-4
    assert logits_fn._cache_size() == 1
    # round trip split/merge keeps the model
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(jnp.asarray(ids))),
                                  np.asarray(lm(jnp.asarray(ids))))


def test_bfloat16_checkpoint_loads_as_either_dtype(tiny_checkpoint):
    path = tiny_checkpoint("gpt_neox", dtype="bfloat16")
    assert hfc.load_tensors(path)["gpt_neox.embed_in.weight"].dtype.name == "bfloat16"
    lm = jm.load_pretrained(path)  # upcast to float32
    assert lm.backbone.embed_in.embedding[...].dtype == jnp.float32
    assert np.isfinite(np.asarray(lm(jnp.asarray(_batch()[0])))).all()


def test_policy_with_value_head_decodes_with_a_cache(tiny_checkpoint):
    """The shared-trunk policy takes the JAX KV cache like a plain LM (the rest of its tests,
    both cores: tests/test_models.py)."""
    pv = jm.load_pretrained(tiny_checkpoint("llama"), with_value_head=True, seed=7)
    q, qm, _, _ = _batch(seed=6)
    cache = pv.init_cache(q.shape[0], q.shape[1] + 1)
    kv = jnp.asarray(np.concatenate([qm, np.ones((q.shape[0], 1), np.int32)], 1))
    out, _ = pv(jnp.asarray(q), kv, cache=cache, cache_index=0)
    assert out.shape == (q.shape[0], q.shape[1], V)


def test_model_config_reads_old_and_new_layouts():
    old_neox = {"model_type": "gpt_neox", "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
                "rotary_pct": 0.5, "rotary_emb_base": 1000, "hidden_act": "gelu"}
    c = ModelConfig.from_hf(old_neox)
    assert (c.partial_rotary_factor, c.rope_theta, c.rotary_dim) == (0.5, 1000.0, 4)
    new_neox = dict(old_neox, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    del new_neox["rotary_pct"], new_neox["rotary_emb_base"]
    c = ModelConfig.from_hf(new_neox)
    assert (c.partial_rotary_factor, c.rope_theta) == (0.25, 500.0)  # GPT-NeoX's default 25%
    old_llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 64, "rope_theta": 5e5,
                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    c = ModelConfig.from_hf(old_llama)
    assert (c.rope_type, c.rope_theta, c.head_dim, c.num_kv_heads) == ("llama3", 5e5, 8, 2)
    assert dict(c.rope_scaling)["factor"] == 8.0
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_hf(dict(old_llama, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf(dict(old_llama, model_type="qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="unsupported activation"):
        jm.CausalLM(ModelConfig.from_hf(dict(old_llama, hidden_act="mish", rope_scaling=None)),
                    rngs=nnx.Rngs(0))
