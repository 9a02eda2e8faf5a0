"""ppo_jax.models vs transformers / ppo_torch.models on the same tiny random checkpoints.

Tolerances: float32 logits agree to 1e-4 absolute (observed ~2e-6: the two compute
the same float32 arithmetic in different orders; |logits| <~ 4 on these checkpoints). bfloat16
is looser, explained at that test. Comparisons are made at real (mask == 1) positions only: at a
left-padding position nothing is attended and each implementation returns its own placeholder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.testing import make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512
F32_ATOL = 1e-4

# Architecture variants beyond each family's defaults, so every config flag we read is exercised.
VARIANTS = {
    "gpt2": {},
    "gpt2-untied-inverse-layer-scale": dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
    "llama": {},
    "llama-tied-llama3-rope-biases-headdim": dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=32,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama-linear-rope-mha": dict(num_key_value_heads=4, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "qwen2": {},
    "qwen2-untied": dict(tie_word_embeddings=False),
    "gpt_neox": {},
    "gpt_neox-sequential-half-rotary": dict(use_parallel_residual=False, hidden_act="gelu_new",
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                              "partial_rotary_factor": 0.5}),
}


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
    # CPU matmuls are full float32 anyway; on GPU JAX's default may use TF32 (torch's does not)
    with jax.default_matmul_precision("float32"):
        yield


def _batch(seed=0, B=4, P=9, R=6):
    return make_padded_batch(seed, B, P, R, V)


def _full(q, qm, r, rm):
    return np.concatenate([q, r], 1), np.concatenate([qm, rm], 1)


def _positions(mask):
    return np.maximum(np.cumsum(mask, 1) - 1, 0)


@torch.no_grad()
def _hf_logits(path, ids, mask, dtype=torch.float32):
    """transformers' own model, positions from the mask computed here: the independent reference."""
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    out = hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
             position_ids=torch.from_numpy(_positions(mask)).long())
    return out.logits.to(torch.promote_types(dtype, torch.float32)).numpy()


def _t(*xs):
    return tuple(torch.from_numpy(np.asarray(x)) for x in xs)


def _np(x):
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tiny_checkpoint, variant):
    arch = variant.split("-")[0]
    path = tiny_checkpoint(arch, **VARIANTS[variant])
    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    ref = _hf_logits(path, ids, mask)
    real = mask == 1
    got = np.asarray(jm.load_pretrained(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], ref[real], atol=F32_ATOL, rtol=0)
    with torch.no_grad():
        ours_torch = _np(tm.load_pretrained(path)(*_t(ids, mask)))
    np.testing.assert_allclose(ours_torch[real], ref[real], atol=F32_ATOL, rtol=0)
    assert np.abs(ref[real]).max() > 0.5  # the logits are not trivially ~0


@pytest.mark.parametrize("arch", ARCHS)
def test_response_logprobs_and_entropy(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    q, qm, r, rm = _batch(seed=1)
    lp_j, ent_j = jm.response_logprobs(jm.load_pretrained(path), q, qm, r, rm, temperature=0.7,
                                       return_entropy=True)
    with torch.no_grad():
        lp_t, ent_t = tm.response_logprobs(tm.load_pretrained(path), *_t(q, qm, r, rm), temperature=0.7,
                                           return_entropy=True)
    np.testing.assert_allclose(np.asarray(lp_j), _np(lp_t), atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ent_j), _np(ent_t), atol=F32_ATOL, rtol=0)
    assert (np.asarray(lp_j)[rm == 0] == 0).all() and (np.asarray(lp_j)[rm == 1] < 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_values_and_scores_from_lm_with_same_seed(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    sj = jm.scalar_model_from_lm(path, seed=11, reward_gain=1.5, reward_bias=0.3)
    st = tm.scalar_model_from_lm(path, seed=11, reward_gain=1.5, reward_bias=0.3)
    q, qm, r, rm = _batch(seed=2)
    with torch.no_grad():
        vt = tm.response_values(st, *_t(q, qm, r, rm))
        scores_t = tm.sequence_scores(st, *_t(q, qm, r, rm))
    np.testing.assert_allclose(np.asarray(jm.response_values(sj, q, qm, r, rm)), _np(vt), atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(jm.sequence_scores(sj, q, qm, r, rm)), _np(scores_t),
                               atol=F32_ATOL, rtol=0)
    assert np.abs(_np(scores_t)).max() > 0.05


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_scalar_checkpoint_matches_transformers_pooling(tiny_checkpoint, arch):
    """A reward model written by transformers (gain/bias in config.json): both backends' score
    = gain * (HF's own pooled logit) + bias. Real tokens are never the pad id here, so HF's
    pad-based pooling picks the same last token as our mask-based one."""
    path = tiny_checkpoint(arch, kind="scalar", reward_gain=2.0, reward_bias=-1.0)
    q, qm, r, rm = _batch(seed=3)
    ids, mask = _full(q, qm, r, rm)
    with torch.no_grad():
        hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        pooled = hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    position_ids=torch.from_numpy(_positions(mask)).long()).logits[:, 0].numpy()
        scores_t = _np(tm.load_scalar_model(path).score(*_t(ids, mask)))
    expected = 2.0 * pooled - 1.0
    np.testing.assert_allclose(scores_t, expected, atol=F32_ATOL, rtol=0)
    scores_j = np.asarray(jm.load_scalar_model(path).score(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(scores_j, expected, atol=F32_ATOL, rtol=0)


def test_shared_trunk_policy(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    q, qm, r, rm = _batch(seed=4)
    out_j = jm.response_logprobs_and_values(jm.load_pretrained(path, with_value_head=True, seed=3),
                                            q, qm, r, rm, temperature=0.8, return_entropy=True)
    with torch.no_grad():
        out_t = tm.response_logprobs_and_values(tm.load_pretrained(path, with_value_head=True, seed=3),
                                                *_t(q, qm, r, rm), temperature=0.8, return_entropy=True)
    for a, b in zip(out_j, out_t):
        np.testing.assert_allclose(np.asarray(a), _np(b), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16(tiny_checkpoint, arch):
    """bf16 weights and activations, float32 logits, in both backends.

    Tolerance: bf16 keeps 8 significant bits, so every rounding is off by up to 2^-9 ~ 0.2%
    relative. The two backends round at different points (fused vs unfused ops, accumulation
    order), so through 2 layers and |logits| <~ 4 they differ by a few 1e-2 (observed <= 0.05).
    0.15 is ~3x that and still far below the logits' spread (std ~0.7), so a wrong weight or a
    float32/bf16 mix-up in one backend would still fail."""
    path = tiny_checkpoint(arch)
    q, qm, r, rm = _batch(seed=5)
    ids, mask = _full(q, qm, r, rm)
    real = mask == 1
    j = jm.load_pretrained(path, dtype="bfloat16")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        t = tm.load_pretrained(path, dtype="bfloat16")(*_t(ids, mask))
    assert j.dtype == jnp.float32 and t.dtype == torch.float32
    j, t = np.asarray(j), _np(t)
    ref32 = _hf_logits(path, ids, mask)
    np.testing.assert_allclose(j[real], t[real], atol=0.15, rtol=0)
    np.testing.assert_allclose(j[real], ref32[real], atol=0.15, rtol=0)
    assert np.abs(j[real] - ref32[real]).max() > 1e-4  # really ran in bf16
    # and against transformers' own bf16 model (bf16 logits, rounded: one more 2^-9 relative)
    hf16 = _hf_logits(path, ids, mask, dtype=torch.bfloat16)
    np.testing.assert_allclose(j[real], hf16[real], atol=0.15, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-untied-inverse-layer-scale", "llama", "gpt_neox"])
def test_float64(tiny_checkpoint, variant):
    """float64 weights and activations (the precision of the multi-step training parity tests):
    logits, values and scores against transformers' own float64 model.

    Tolerance: GPT-2 computes everything in float64 in all three: 1e-12 (observed ~3e-15).
    Rotary models: transformers computes the rotary angles' cos/sin in float32 even for a float64
    model (its rotary embedding calls .float()), and so do we (`layers.apply_rope`), but XLA's and
    torch's float32 cos/sin round differently (~1 ulp, 6e-8): observed ~1e-6 on the logits, 1e-5."""
    arch = variant.split("-")[0]
    path = tiny_checkpoint(arch, **VARIANTS[variant])
    q, qm, r, rm = _batch(seed=7)
    ids, mask = _full(q, qm, r, rm)
    real = mask == 1
    tol = 1e-12 if arch == "gpt2" else 1e-5
    ref = _hf_logits(path, ids, mask, dtype=torch.float64)
    with jax.enable_x64(True):
        j = jm.load_pretrained(path, dtype="float64")(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
        sj = jm.scalar_model_from_lm(path, seed=11, dtype="float64")
        vj, scores_j = jm.response_values(sj, q, qm, r, rm), jm.sequence_scores(sj, q, qm, r, rm)
        assert j.dtype == vj.dtype == scores_j.dtype == jnp.float64
        j, vj, scores_j = np.asarray(j), np.asarray(vj), np.asarray(scores_j)
    with torch.no_grad():
        t = tm.load_pretrained(path, dtype="float64")(*_t(ids, mask))
        st = tm.scalar_model_from_lm(path, seed=11, dtype="float64")
        vt, scores_t = tm.response_values(st, *_t(q, qm, r, rm)), tm.sequence_scores(st, *_t(q, qm, r, rm))
    assert t.dtype == vt.dtype == scores_t.dtype == torch.float64
    for got in (j, t.numpy()):
        np.testing.assert_allclose(got[real], ref[real], atol=tol, rtol=0)
    np.testing.assert_allclose(vj, vt.numpy(), atol=tol, rtol=0)
    np.testing.assert_allclose(scores_j, scores_t.numpy(), atol=tol, rtol=0)
    f32 = _hf_logits(path, ids, mask)
    assert np.abs(j[real] - f32[real]).max() > 1e-9  # really ran in float64


def test_float64_needs_x64():
    with pytest.raises(ValueError, match="x64"):
        jm.ModelConfig.from_hf({"model_type": "gpt2", "vocab_size": 8, "n_embd": 4, "n_layer": 1,
                                "n_head": 1, "n_positions": 8}, dtype="float64")


@pytest.mark.parametrize("arch", ARCHS)
def test_jax_saved_checkpoint_loads_in_transformers(tiny_checkpoint, tmp_path, arch):
    path = tiny_checkpoint(arch)
    lm = jm.load_pretrained(path)
    # change the weights (as training would) so the test sees JAX's weights, not the source's
    graphdef, state = nnx.split(lm)
    state = jax.tree.map(lambda x: x * 1.05 + 0.01, state)
    lm = nnx.merge(graphdef, state)
    shard = 50_000 if arch == "qwen2" else None
    out = jm.save_pretrained(lm, tmp_path / "jax_out", max_shard_bytes=shard)
    assert (out / hfc.SAFE_WEIGHTS_INDEX_NAME).is_file() == (shard is not None)
    q, qm, r, rm = _batch(seed=6)
    ids, mask = _full(q, qm, r, rm)
    real = mask == 1
    ref = _hf_logits(out, ids, mask)
    got = np.asarray(lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], ref[real], atol=F32_ATOL, rtol=0)
    assert np.abs(ref[real] - _hf_logits(path, ids, mask)[real]).max() > 1e-2  # weights did change


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_scalar_models_cross_save(tiny_checkpoint, tmp_path, arch):
    """A JAX value/reward model saved loads in transformers and ppo_torch with the same scores,
    and a torch one loads in JAX."""
    q, qm, r, rm = _batch(seed=7)
    ids, mask = _full(q, qm, r, rm)
    sj = jm.scalar_model_from_lm(tiny_checkpoint(arch), seed=2, reward_gain=0.5, reward_bias=2.0)
    jm.save_pretrained(sj, tmp_path / "j")
    assert AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "j")).config.num_labels == 1
    with torch.no_grad():
        st = tm.load_scalar_model(tmp_path / "j")
        np.testing.assert_allclose(_np(st.score(*_t(ids, mask))),
                                   np.asarray(sj.score(jnp.asarray(ids), jnp.asarray(mask))), atol=F32_ATOL)
        st.reward_bias = -3.0
        tm.save_pretrained(st, tmp_path / "t")
        expected = _np(st.values(*_t(ids, mask)))
    back = jm.load_scalar_model(tmp_path / "t")
    assert (back.reward_gain, back.reward_bias) == (0.5, -3.0)
    real = mask == 1
    np.testing.assert_allclose(np.asarray(back.values(jnp.asarray(ids), jnp.asarray(mask)))[real],
                               expected[real], atol=F32_ATOL)


def test_bf16_jax_checkpoint_loads_in_transformers(tiny_checkpoint, tmp_path):
    lm = jm.load_pretrained(tiny_checkpoint("llama"), dtype="bfloat16")
    out = jm.save_pretrained(lm, tmp_path / "bf16")
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16  # saved dtype is kept
    orig = hfc.load_tensors(tiny_checkpoint("llama"))["model.norm.weight"]
    np.testing.assert_array_equal(hfc.load_tensors(out)["model.norm.weight"],
                                  orig.astype(hfc.load_tensors(out)["model.norm.weight"].dtype))


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_sharded_transformers_checkpoint(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, shard=True)
    assert len(hfc.weight_files(path)) > 1
    q, qm, r, rm = _batch(seed=8)
    ids, mask = _full(q, qm, r, rm)
    real = mask == 1
    got = np.asarray(jm.load_pretrained(path)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[real], _hf_logits(path, ids, mask)[real], atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_jax_kv_cache_decode_matches_transformers(tiny_checkpoint, arch):
    """JAX prefill of a left-padded prompt + one-token decode steps == transformers' full forward."""
    path = tiny_checkpoint(arch)
    lm = jm.load_pretrained(path)
    q, qm, r, rm = _batch(seed=9)
    rm = np.ones_like(rm)
    ids, mask = _full(q, qm, r, rm)
    B, P = q.shape
    R = r.shape[1]
    kv = np.concatenate([qm, np.zeros_like(rm)], 1)
    logits, cache = lm(jnp.asarray(q), attention_mask=jnp.asarray(kv), cache=lm.init_cache(B, P + R),
                       cache_index=0)
    steps = [np.asarray(logits)]
    for t in range(R - 1):
        kv[:, P + t] = 1
        logits, cache = lm(jnp.asarray(r[:, t:t + 1]), attention_mask=jnp.asarray(kv), cache=cache,
                           cache_index=P + t)
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, 1)
    ref = _hf_logits(path, ids, mask)[:, :P + R - 1]
    real = mask[:, :P + R - 1] == 1
    np.testing.assert_allclose(inc[real], ref[real], atol=F32_ATOL, rtol=0)
    # greedy tokens agree too
    np.testing.assert_array_equal(inc[:, P - 1:].argmax(-1), ref[:, P - 1:].argmax(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_logprob_gradients_match(tiny_checkpoint, arch):
    """d sum(response log-probs) / d every weight, JAX vs torch, compared under HF names (the JAX
    gradient state is merged into a model and read out like weights)."""
    path = tiny_checkpoint(arch)
    q, qm, r, rm = _batch(seed=10)
    lm = jm.load_pretrained(path)
    graphdef, state = nnx.split(lm)

    def objective(state):
        return jm.response_logprobs(nnx.merge(graphdef, state), q, qm, r, rm, temperature=0.7).sum()

    grads_j = jm.model_tensors(nnx.merge(graphdef, jax.grad(objective)(state)))
    lt = tm.load_pretrained(path)
    tm.response_logprobs(lt, *_t(q, qm, r, rm), temperature=0.7).sum().backward()
    # transformers 5 calls GPT-NeoX's `embed_out` `lm_head` in memory (not on disk)
    grads_t = {k.replace("lm_head.", f"{hfc.LM_HEAD_NAME[arch]}."): p.grad.numpy()
               for k, p in lt.hf_model.named_parameters()}
    assert set(grads_j) <= set(grads_t)
    for k, g in grads_j.items():
        # float32 sums over B*R tokens in different orders: compared relative to the tensor's
        # largest gradient (observed ~2e-6 of it; 1e-4 leaves 50x headroom)
        scale = max(np.abs(grads_t[k]).max(), 1e-3)
        np.testing.assert_allclose(g, grads_t[k], atol=1e-4 * scale, rtol=0, err_msg=k)
    assert max(np.abs(g).max() for g in grads_j.values()) > 1e-2
