"""Unit tests of the two cores' `models` packages on tiny random checkpoints, each test run on
both (through `parity_tests.backends.ModelCore`: numpy in, numpy out). What only one core has --
JAX's explicit KV cache and jitted decode, torch's autograd and Hugging Face cache -- is in
tests/test_models_jax.py and tests/test_models_torch.py; cross-backend equality in
parity_tests/test_models_parity.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from parity_tests.backends import MODEL_CORES
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.rewards import ScoreRequest
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512
cores = pytest.mark.parametrize("core", MODEL_CORES, ids=lambda c: c.name)


def _batch(seed=0, B=3, P=7, R=5):
    return make_padded_batch(seed, B, P, R, V)


def _full(q, qm, r, rm):
    return np.concatenate([q, r], 1), np.concatenate([qm, rm], 1)


@cores
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_left_padding(core, tiny_checkpoint, arch):
    """Logits are float32 [B, T, V]; a left-padded row gives the same logits at its real
    positions as the same tokens unpadded (positions come from the mask)."""
    m = core.models
    lm = m.load_pretrained(tiny_checkpoint(arch))
    assert isinstance(lm, m.CausalLM) and lm.config.model_type == arch
    ids, mask = _full(*_batch())
    logits = core.run(lm, ids, attention_mask=mask)
    assert logits.shape == (3, 12, V) and logits.dtype == np.float32
    assert np.isfinite(logits).all()  # padding rows too: no NaN from empty softmax rows
    row = 1  # the shortest prompt: most left padding
    real = mask[row] == 1
    alone = core.run(lm, ids[row][real][None])  # no padding, default all-ones mask
    np.testing.assert_allclose(logits[row][real], alone[0], atol=1e-5, rtol=0)
    # guards (so the check above can fail): attending the pads, or other positions, changes it
    assert np.abs(core.run(lm, ids[row][None])[0][real] - alone[0]).max() > 1e-3
    n = int(real.sum())
    spread = core.run(lm, ids[row][real][None], positions=2 * np.arange(n)[None])
    assert np.abs(spread - alone).max() > 1e-3


@cores
def test_logits_to_keep(core, tiny_checkpoint):
    lm = core.models.load_pretrained(tiny_checkpoint("gpt_neox"))
    ids = _batch()[0]
    np.testing.assert_allclose(core.run(lm, ids, logits_to_keep=2), core.run(lm, ids)[:, -2:], atol=1e-6, rtol=0)


@cores
@pytest.mark.parametrize("arch", ARCHS)
def test_response_logprobs_and_entropy_by_hand(core, tiny_checkpoint, arch):
    m = core.models
    lm = m.load_pretrained(tiny_checkpoint(arch))
    q, qm, r, rm = _batch(seed=3)
    P, R = q.shape[1], r.shape[1]
    temp = 0.7
    lp, ent = core.run(m.response_logprobs, lm, q, qm, r, rm, temperature=temp, return_entropy=True)
    assert lp.shape == ent.shape == r.shape and lp.dtype == np.float32
    ids, mask = _full(q, qm, r, rm)
    logits = core.run(lm, ids, attention_mask=mask).astype(np.float64) / temp
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    for b in range(q.shape[0]):
        for t in range(R):
            if rm[b, t]:
                assert abs(lp[b, t] - logp[b, P - 1 + t, r[b, t]]) < 1e-4
                p = np.exp(logp[b, P - 1 + t])
                assert abs(ent[b, t] - (-(p * logp[b, P - 1 + t]).sum())) < 1e-4
            else:
                assert lp[b, t] == 0 and ent[b, t] == 0
    assert np.abs(lp).sum() > 0
    # temperature is applied: temperature 1 gives different log-probs
    assert np.abs(core.run(m.response_logprobs, lm, q, qm, r, rm) - lp).max() > 1e-3


@cores
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_scalar_model_values_and_scores(core, tiny_checkpoint, tmp_path, arch):
    m = core.models
    path = tiny_checkpoint(arch)
    sm = m.scalar_model_from_lm(path, seed=5, reward_gain=2.0, reward_bias=-0.5)
    head = core.score_head(sm)
    np.testing.assert_array_equal(head, m.init_score_head(sm.config.hidden_size, 5))
    assert np.abs(core.score_head(m.scalar_model_from_lm(path, seed=6)) - head).max() > 0
    # the backbone is the LM's
    lm = m.load_pretrained(path)
    ids0 = _batch()[0]
    np.testing.assert_array_equal(core.run(lm.hidden_states, ids0)[0], core.trunk(sm, ids0))
    # from a loaded model: same weights as from the path
    sm2 = m.scalar_model_from_lm(lm, seed=5)
    t1, t2 = m.model_tensors(sm), m.model_tensors(sm2)
    assert set(t1) == set(t2)
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)

    q, qm, r, rm = _batch(seed=4)
    ids, mask = _full(q, qm, r, rm)
    values = core.run(sm.values, ids, mask)
    assert values.shape == ids.shape and values.dtype == np.float32
    # values carry the normalisation: gain * (the raw head, what sm2 with gain 1 / bias 0 reads) + bias
    np.testing.assert_allclose(values, 2.0 * core.run(sm2.values, ids, mask) - 0.5, atol=1e-6, rtol=0)
    last = np.array([np.nonzero(row)[0].max() for row in mask])
    expected = values[np.arange(len(ids)), last]
    np.testing.assert_allclose(core.run(sm.score, ids, mask), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(core.run(m.sequence_scores, sm, q, qm, r, rm), expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(core.run(sm.score, ScoreRequest(q, qm, r, rm)), expected, atol=1e-6, rtol=0)
    rv = core.run(m.response_values, sm, q, qm, r, rm)
    P = q.shape[1]
    np.testing.assert_allclose(rv, np.where(rm == 1, values[:, P - 1:P - 1 + r.shape[1]], 0), atol=1e-6, rtol=0)

    # save / load keeps the head and the reward normalisation, in the HF seq-cls format
    sm.reward_gain, sm.reward_bias = 3.0, 0.25
    m.save_pretrained(sm, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == [hfc.SCALAR_ARCH[arch]] and cfg["id2label"] == {"0": "LABEL_0"}
    assert cfg["ppo_rlhf"] == {"reward_gain": 3.0, "reward_bias": 0.25}
    back = m.load_scalar_model(tmp_path / "rm")
    assert (back.reward_gain, back.reward_bias) == (3.0, 0.25)
    np.testing.assert_array_equal(core.run(back.score, ids, mask), core.run(sm.score, ids, mask))


@cores
def test_score_reads_last_mask_position_not_pad_token(core, tiny_checkpoint):
    """pad == EOS: the score must come from the mask (the EOS at the end of the response), not
    from the last non-pad token as HF's pooling would pick."""
    sm = core.models.load_scalar_model(tiny_checkpoint("llama", kind="scalar"))
    ids = np.array([[PAD_ID, 5, 6, EOS_ID, PAD_ID], [7, 8, 9, 10, EOS_ID]], np.int64)
    ids[ids == EOS_ID] = PAD_ID  # pad id used as EOS too
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int64)
    values = core.run(sm.values, ids, mask)
    np.testing.assert_allclose(core.run(sm.score, ids, mask), [values[0, 3], values[1, 4]], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(core.run(core.models.last_token_index, mask), [3, 4])


@cores
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_save_roundtrip_sharded_is_exact(core, tiny_checkpoint, tmp_path, arch):
    m = core.models
    src = tiny_checkpoint(arch)
    lm = m.load_pretrained(src)
    out = m.save_pretrained(lm, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / hfc.SAFE_WEIGHTS_INDEX_NAME).is_file() and len(hfc.weight_files(out)) > 1
    # same tensors as the transformers-written original, bit for bit
    orig, saved = hfc.load_tensors(src), hfc.load_tensors(out)
    assert set(saved) == {k for k in orig if not k.endswith(hfc.IGNORED_SUFFIXES)}
    for k in saved:
        np.testing.assert_array_equal(saved[k], orig[k], err_msg=k)
    mine = m.model_tensors(lm)  # on-disk names (gpt_neox: embed_out), tied head left out
    assert set(mine) == set(saved)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [hfc.CAUSAL_LM_ARCH[arch]] and cfg["model_type"] == arch
    back = m.load_pretrained(out)
    ids = _batch()[0]
    np.testing.assert_array_equal(core.run(back, ids), core.run(lm, ids))
    # saving again unsharded removes the stale shards and their index
    m.save_pretrained(back, out)
    assert hfc.weight_files(out) == [out / hfc.SAFE_WEIGHTS_NAME]
    assert not list(out.glob("model-*.safetensors")) and not (out / hfc.SAFE_WEIGHTS_INDEX_NAME).exists()


@cores
def test_bfloat16_weights_float32_logits(core, tiny_checkpoint):
    m = core.models
    path = tiny_checkpoint("qwen2")
    f32, bf16 = m.load_pretrained(path), m.load_pretrained(path, dtype="bfloat16")
    assert core.q_proj_dtype(bf16) == "bfloat16" and core.q_proj_dtype(f32) == "float32"
    ids, mask = _full(*_batch())
    a, b = core.run(f32, ids, attention_mask=mask), core.run(bf16, ids, attention_mask=mask)
    assert b.dtype == np.float32
    err = np.abs(b - a)[mask == 1].max()
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); with |logits| <~ 4 through 2 layers the
    # error is a few 1e-2. It must be nonzero: the activations really are bf16.
    assert 1e-4 < err < 0.15
    with pytest.raises(ValueError, match="not supported"):
        m.load_pretrained(path, dtype="float16")


@cores
def test_policy_with_value_head(core, tiny_checkpoint, tmp_path):
    m = core.models
    path = tiny_checkpoint("llama")
    pv = m.load_pretrained(path, with_value_head=True, seed=7)
    assert isinstance(pv, m.PolicyWithValueHead)
    np.testing.assert_array_equal(core.value_head(pv), m.init_score_head(64, 7))
    q, qm, r, rm = _batch(seed=6)
    ids, mask = _full(q, qm, r, rm)
    logits, values = core.run(pv, ids, mask, return_values=True)
    lm = m.load_pretrained(path)
    np.testing.assert_allclose(logits, core.run(lm, ids, mask), atol=1e-6, rtol=0)
    np.testing.assert_allclose(values, core.run(pv.values, ids, mask), atol=1e-6, rtol=0)
    lp, v, ent = core.run(m.response_logprobs_and_values, pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
    lp2, ent2 = core.run(m.response_logprobs, pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
    np.testing.assert_allclose(lp, lp2, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, ent2, atol=1e-5, rtol=0)
    np.testing.assert_allclose(v, core.run(m.response_values, pv, q, qm, r, rm), atol=1e-6, rtol=0)
    # the value head survives a save / load (value_head.safetensors); the LM part stays a plain HF LM
    core.scale_value_head(pv, 2.0)
    m.save_pretrained(pv, tmp_path / "pv")
    back = m.load_pretrained(tmp_path / "pv", with_value_head=True, seed=0)
    np.testing.assert_array_equal(core.value_head(back), core.value_head(pv))
    assert isinstance(m.load_pretrained(tmp_path / "pv"), m.CausalLM)


@cores
def test_errors_are_clear(core, tiny_checkpoint, tmp_path):
    m = core.models
    with pytest.raises(FileNotFoundError, match="does not exist"):
        m.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        m.load_pretrained(tmp_path / "empty")
    src = tiny_checkpoint("gpt2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(src / "config.json", noweights / "config.json")
    (noweights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*only safetensors"):
        m.load_pretrained(noweights)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'.*gpt2, llama, qwen2, gpt_neox"):
        m.load_pretrained(bad)
    with pytest.raises(ValueError, match="load_scalar_model"):
        m.load_pretrained(tiny_checkpoint("gpt2", kind="scalar"))
    with pytest.raises(ValueError, match="scalar_model_from_lm"):
        m.load_scalar_model(src)
    # a tensor the model does not use is an error (an unsupported variant must not load silently)
    extra = tmp_path / "extra"
    shutil.copytree(tiny_checkpoint("llama"), extra)
    tensors = hfc.load_tensors(extra)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    hfc.save_tensors(extra, tensors)
    with pytest.raises(ValueError, match="q_proj.bias"):
        m.load_pretrained(extra)
