"""Unit tests of ppo_jax.models on tiny random checkpoints (no torch at test time beyond building
the checkpoints). Cross-backend checks live in parity_tests/test_models_parity.py."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ppo_jax.models as jm
from ppo_jax.models.config import ModelConfig
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.rewards import ScoreRequest
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512


def _batch(seed=0, B=3, P=7, R=5):
    return make_padded_batch(seed, B, P, R, V)


def _full(q, qm, r, rm):
    return np.concatenate([q, r], 1), np.concatenate([qm, rm], 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_left_padding(tiny_checkpoint, arch):
    """Logits are float32 [B, T, V]; a left-padded row gives the same logits at its real
    positions as the same tokens unpadded (positions come from the mask)."""
    lm = jm.load_pretrained(tiny_checkpoint(arch))
    assert isinstance(lm, jm.CausalLM) and lm.config.model_type == arch
    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    logits = lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert logits.shape == (3, 12, V) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()  # padding rows too: no NaN from empty softmax rows
    row = 1  # the shortest prompt: most left padding
    real = mask[row] == 1
    alone = lm(jnp.asarray(ids[row][real][None]))  # no padding, default all-ones mask
    np.testing.assert_allclose(np.asarray(logits)[row][real], np.asarray(alone)[0], atol=1e-5)
    # guards (so the check above can fail): attending the pads, or other positions, changes it
    no_mask = lm(jnp.asarray(ids[row][None]))
    assert np.abs(np.asarray(no_mask)[0][real] - np.asarray(alone)[0]).max() > 1e-3
    n = int(real.sum())
    spread = lm(jnp.asarray(ids[row][real][None]), positions=2 * jnp.arange(n)[None])
    assert np.abs(np.asarray(spread) - np.asarray(alone)).max() > 1e-3


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


def test_logits_to_keep(tiny_checkpoint):
    lm = jm.load_pretrained(tiny_checkpoint("gpt_neox"))
    ids = jnp.asarray(_batch()[0])
    full = np.asarray(lm(ids))
    np.testing.assert_allclose(np.asarray(lm(ids, logits_to_keep=2)), full[:, -2:], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_response_logprobs_and_entropy_by_hand(tiny_checkpoint, arch):
    lm = jm.load_pretrained(tiny_checkpoint(arch))
    q, qm, r, rm = _batch(seed=3)
    P, R = q.shape[1], r.shape[1]
    temp = 0.7
    lp, ent = jm.response_logprobs(lm, q, qm, r, rm, temperature=temp, return_entropy=True)
    assert lp.shape == ent.shape == r.shape and lp.dtype == jnp.float32
    ids, mask = _full(q, qm, r, rm)
    logits = np.asarray(lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)), np.float64) / temp
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    for b in range(q.shape[0]):
        for t in range(R):
            if rm[b, t]:
                assert abs(lp[b, t] - logp[b, P - 1 + t, r[b, t]]) < 1e-4
                p = np.exp(logp[b, P - 1 + t])
                assert abs(ent[b, t] - (-(p * logp[b, P - 1 + t]).sum())) < 1e-4
            else:
                assert lp[b, t] == 0 and ent[b, t] == 0
    assert np.abs(np.asarray(lp)).sum() > 0
    # temperature is applied: temperature 1 gives different log-probs
    lp1 = jm.response_logprobs(lm, q, qm, r, rm)
    assert np.abs(np.asarray(lp1) - np.asarray(lp)).max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_scalar_model_values_and_scores(tiny_checkpoint, tmp_path, arch):
    path = tiny_checkpoint(arch)
    sm = jm.scalar_model_from_lm(path, seed=5, reward_gain=2.0, reward_bias=-0.5)
    head = np.asarray(sm.score_head.kernel[...]).T
    np.testing.assert_array_equal(head, jm.init_score_head(sm.config.hidden_size, 5))
    assert np.abs(np.asarray(jm.scalar_model_from_lm(path, seed=6).score_head.kernel[...]).T - head).max() > 0
    # the backbone is the LM's
    lm = jm.load_pretrained(path)
    h_lm, _ = lm.hidden_states(jnp.asarray(_batch()[0]))
    h_sm, _ = sm.backbone(jnp.asarray(_batch()[0]))
    np.testing.assert_array_equal(np.asarray(h_lm), np.asarray(h_sm))
    # from a loaded model: same weights as from the path
    sm2 = jm.scalar_model_from_lm(lm, seed=5)
    for k, v in jm.model_tensors(sm2).items():
        np.testing.assert_array_equal(v, jm.model_tensors(sm)[k])

    q, qm, r, rm = _batch(seed=4)
    ids, mask = _full(q, qm, r, rm)
    values = np.asarray(sm.values(jnp.asarray(ids), jnp.asarray(mask)))
    assert values.shape == ids.shape and values.dtype == np.float32
    # values carry the normalisation: gain * (the raw head, what sm2 with gain 1 / bias 0 reads) + bias
    raw = np.asarray(sm2.values(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(values, 2.0 * raw - 0.5, atol=1e-6)
    last = np.array([np.nonzero(m)[0].max() for m in mask])
    expected = values[np.arange(len(ids)), last]
    np.testing.assert_allclose(np.asarray(sm.score(jnp.asarray(ids), jnp.asarray(mask))), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jm.sequence_scores(sm, q, qm, r, rm)), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sm.score(ScoreRequest(q, qm, r, rm))), expected, atol=1e-6)
    rv = np.asarray(jm.response_values(sm, q, qm, r, rm))
    P = q.shape[1]
    np.testing.assert_allclose(rv, np.where(rm == 1, values[:, P - 1:P - 1 + r.shape[1]], 0), atol=1e-6)

    # save / load keeps the head and the reward normalisation, in the HF seq-cls format
    sm.reward_gain, sm.reward_bias = 3.0, 0.25
    jm.save_pretrained(sm, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == [hfc.SCALAR_ARCH[arch]] and cfg["id2label"] == {"0": "LABEL_0"}
    assert cfg["ppo_rlhf"] == {"reward_gain": 3.0, "reward_bias": 0.25}
    back = jm.load_scalar_model(tmp_path / "rm")
    assert (back.reward_gain, back.reward_bias) == (3.0, 0.25)
    np.testing.assert_array_equal(np.asarray(back.score(jnp.asarray(ids), jnp.asarray(mask))),
                                  np.asarray(sm.score(jnp.asarray(ids), jnp.asarray(mask))))


def test_score_reads_last_mask_position_not_pad_token(tiny_checkpoint):
    """pad == EOS: the score must come from the mask (the EOS at the end of the response), not
    from the last non-pad token as HF's pooling would pick."""
    sm = jm.load_scalar_model(tiny_checkpoint("llama", kind="scalar"))
    ids = np.array([[PAD_ID, 5, 6, EOS_ID, PAD_ID], [7, 8, 9, 10, EOS_ID]], np.int32)
    ids[ids == EOS_ID] = PAD_ID  # pad id used as EOS too
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
    values = np.asarray(sm.values(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(sm.score(jnp.asarray(ids), jnp.asarray(mask))),
                               [values[0, 3], values[1, 4]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jm.last_token_index(jnp.asarray(mask))), [3, 4])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_roundtrip_sharded_is_exact(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    lm = jm.load_pretrained(src)
    out = jm.save_pretrained(lm, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / hfc.SAFE_WEIGHTS_INDEX_NAME).is_file() and len(hfc.weight_files(out)) > 1
    # same tensors as the transformers-written original, bit for bit
    orig, saved = hfc.load_tensors(src), hfc.load_tensors(out)
    assert set(saved) == {k for k in orig if not k.endswith(hfc.IGNORED_SUFFIXES)}
    for k in saved:
        np.testing.assert_array_equal(saved[k], orig[k], err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [hfc.CAUSAL_LM_ARCH[arch]] and cfg["model_type"] == arch
    back = jm.load_pretrained(out)
    ids = jnp.asarray(_batch()[0])
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(lm(ids)))
    # saving again unsharded removes the stale shards
    jm.save_pretrained(back, out)
    assert hfc.weight_files(out) == [out / hfc.SAFE_WEIGHTS_NAME]
    assert not list(out.glob("model-*.safetensors"))


def test_bfloat16_weights_float32_logits(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    f32, bf16 = jm.load_pretrained(path), jm.load_pretrained(path, dtype="bfloat16")
    kernel = bf16.backbone.layers.stack.self_attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    a = np.asarray(f32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    b = bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert b.dtype == jnp.float32
    real = mask == 1
    err = np.abs(np.asarray(b) - a)[real].max()
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); with |logits| <~ 4 through 2 layers the
    # error is a few 1e-2. It must be nonzero: the activations really are bf16.
    assert 1e-4 < err < 0.15
    assert jm.load_pretrained(path, dtype=jnp.bfloat16).config.dtype == "bfloat16"
    with pytest.raises(ValueError, match="not supported"):
        jm.load_pretrained(path, dtype="float16")


def test_bfloat16_checkpoint_loads_as_either_dtype(tiny_checkpoint):
    path = tiny_checkpoint("gpt_neox", dtype="bfloat16")
    assert hfc.load_tensors(path)["gpt_neox.embed_in.weight"].dtype.name == "bfloat16"
    lm = jm.load_pretrained(path)  # upcast to float32
    assert lm.backbone.embed_in.embedding[...].dtype == jnp.float32
    assert np.isfinite(np.asarray(lm(jnp.asarray(_batch()[0])))).all()


def test_policy_with_value_head(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    pv = jm.load_pretrained(path, with_value_head=True, seed=7)
    assert isinstance(pv, jm.PolicyWithValueHead)
    np.testing.assert_array_equal(np.asarray(pv.value_head.kernel[...]).T, jm.init_score_head(64, 7))
    q, qm, r, rm = _batch(seed=6)
    ids, mask = _full(q, qm, r, rm)
    logits, values = pv(jnp.asarray(ids), jnp.asarray(mask), return_values=True)
    lm = jm.load_pretrained(path)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)
    np.testing.assert_allclose(np.asarray(values), np.asarray(pv.values(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)
    lp, v, ent = jm.response_logprobs_and_values(pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
    lp2, ent2 = jm.response_logprobs(pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lp2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ent2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(v), np.asarray(jm.response_values(pv, q, qm, r, rm)), atol=1e-6)
    # the value head survives a save / load (value_head.safetensors); the LM part stays a plain HF LM
    pv.value_head.kernel[...] = pv.value_head.kernel[...] * 2.0
    jm.save_pretrained(pv, tmp_path / "pv")
    back = jm.load_pretrained(tmp_path / "pv", with_value_head=True, seed=0)
    np.testing.assert_allclose(np.asarray(back.value_head.kernel[...]), np.asarray(pv.value_head.kernel[...]))
    assert isinstance(jm.load_pretrained(tmp_path / "pv"), jm.CausalLM)
    # the shared-trunk policy also decodes with a cache
    cache = pv.init_cache(q.shape[0], q.shape[1] + 1)
    kv = jnp.asarray(np.concatenate([qm, np.ones((q.shape[0], 1), np.int32)], 1))
    out, _ = pv(jnp.asarray(q), kv, cache=cache, cache_index=0)
    assert out.shape == (q.shape[0], q.shape[1], V)


def test_errors_are_clear(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jm.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        jm.load_pretrained(tmp_path / "empty")
    src = tiny_checkpoint("gpt2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(src / "config.json", noweights / "config.json")
    (noweights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*only safetensors"):
        jm.load_pretrained(noweights)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'.*gpt2, llama, qwen2, gpt_neox"):
        jm.load_pretrained(bad)
    with pytest.raises(ValueError, match="load_scalar_model"):
        jm.load_pretrained(tiny_checkpoint("gpt2", kind="scalar"))
    with pytest.raises(ValueError, match="scalar_model_from_lm"):
        jm.load_scalar_model(src)
    # a tensor our model does not use is an error (an unsupported variant must not load silently)
    extra = tmp_path / "extra"
    shutil.copytree(tiny_checkpoint("llama"), extra)
    tensors = hfc.load_tensors(extra)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    hfc.save_tensors(extra, tensors)
    with pytest.raises(ValueError, match="q_proj.bias"):
        jm.load_pretrained(extra)


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
