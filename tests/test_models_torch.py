"""Unit tests of ppo_torch.models on tiny random checkpoints. Mirror: tests/test_models_jax.py;
cross-backend checks live in parity_tests/test_models_parity.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import ppo_torch.models as tm
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf.rewards import ScoreRequest
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512


def _batch(seed=0, B=3, P=7, R=5):
    return tuple(torch.from_numpy(x) for x in make_padded_batch(seed, B, P, R, V))


def _full(q, qm, r, rm):
    return torch.cat([q, r], 1), torch.cat([qm, rm], 1)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_forward_shapes_and_left_padding(tiny_checkpoint, arch):
    lm = tm.load_pretrained(tiny_checkpoint(arch))
    assert isinstance(lm, tm.CausalLM) and lm.config.model_type == arch and not lm.training
    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    logits = lm(ids, attention_mask=mask)
    assert logits.shape == (3, 12, V) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    row = 1
    real = mask[row] == 1
    alone = lm(ids[row][real][None])
    torch.testing.assert_close(logits[row][real], alone[0], atol=1e-5, rtol=0)
    # guards: attending the pads, or other positions, changes the result
    assert (lm(ids[row][None])[0][real] - alone[0]).abs().max() > 1e-3
    n = int(real.sum())
    assert (lm(ids[row][real][None], positions=2 * torch.arange(n)[None]) - alone).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_checkpoint, arch):
    lm = tm.load_pretrained(tiny_checkpoint(arch))
    q, qm, r, rm = _batch(seed=1)
    ids, mask = _full(q, qm, r, rm)
    P, R = q.shape[1], r.shape[1]
    full = lm(ids, attention_mask=mask)
    logits, cache = lm(q, attention_mask=qm, use_cache=True)
    steps = [logits]
    for t in range(R):
        logits, cache = lm(r[:, t:t + 1], attention_mask=mask[:, :P + t + 1], cache=cache)
        assert logits.shape == (3, 1, V)
        steps.append(logits)
    assert cache.get_seq_length() == P + R
    inc = torch.cat(steps, 1)
    real = mask == 1
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_logits_to_keep(tiny_checkpoint):
    lm = tm.load_pretrained(tiny_checkpoint("gpt_neox"))
    ids = _batch()[0]
    torch.testing.assert_close(lm(ids, logits_to_keep=2), lm(ids)[:, -2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_response_logprobs_and_entropy_by_hand(tiny_checkpoint, arch):
    lm = tm.load_pretrained(tiny_checkpoint(arch))
    q, qm, r, rm = _batch(seed=3)
    P, R = q.shape[1], r.shape[1]
    temp = 0.7
    lp, ent = tm.response_logprobs(lm, q, qm, r, rm, temperature=temp, return_entropy=True)
    assert lp.shape == ent.shape == r.shape and lp.dtype == torch.float32
    ids, mask = _full(q, qm, r, rm)
    logp = torch.log_softmax(lm(ids, attention_mask=mask).double() / temp, -1)
    for b in range(q.shape[0]):
        for t in range(R):
            if rm[b, t]:
                assert abs(lp[b, t] - logp[b, P - 1 + t, r[b, t]]) < 1e-4
                assert abs(ent[b, t] + (logp[b, P - 1 + t].exp() * logp[b, P - 1 + t]).sum()) < 1e-4
            else:
                assert lp[b, t] == 0 and ent[b, t] == 0
    assert lp.abs().sum() > 0
    assert (tm.response_logprobs(lm, q, qm, r, rm) - lp).abs().max() > 1e-3


def test_response_logprobs_has_gradients(tiny_checkpoint):
    lm = tm.load_pretrained(tiny_checkpoint("llama"))
    q, qm, r, rm = _batch()
    tm.response_logprobs(lm, q, qm, r, rm).sum().backward()
    g = lm.hf_model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
@torch.no_grad()
def test_scalar_model_values_and_scores(tiny_checkpoint, tmp_path, arch):
    path = tiny_checkpoint(arch)
    sm = tm.scalar_model_from_lm(path, seed=5, reward_gain=2.0, reward_bias=-0.5)
    head = sm.hf_model.score.weight.numpy()
    np.testing.assert_array_equal(head, tm.init_score_head(sm.config.hidden_size, 5))
    assert np.abs(tm.scalar_model_from_lm(path, seed=6).hf_model.score.weight.numpy() - head).max() > 0
    lm = tm.load_pretrained(path)
    ids0 = _batch()[0]
    torch.testing.assert_close(lm.hidden_states(ids0)[0],
                               sm.hf_model.base_model(ids0).last_hidden_state, atol=0, rtol=0)
    sm2 = tm.scalar_model_from_lm(lm, seed=5)
    t1, t2 = tm.model_tensors(sm), tm.model_tensors(sm2)
    assert set(t1) == set(t2)
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)

    q, qm, r, rm = _batch(seed=4)
    ids, mask = _full(q, qm, r, rm)
    values = sm.values(ids, mask)
    assert values.shape == ids.shape and values.dtype == torch.float32
    # values carry the normalisation: gain * (the raw head, what sm2 with gain 1 / bias 0 reads) + bias
    torch.testing.assert_close(values, 2.0 * sm2.values(ids, mask) - 0.5, atol=1e-6, rtol=0)
    last = torch.tensor([int(torch.nonzero(m).max()) for m in mask])
    expected = values[torch.arange(len(ids)), last]
    torch.testing.assert_close(sm.score(ids, mask), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(tm.sequence_scores(sm, q, qm, r, rm), expected, atol=1e-6, rtol=0)
    req = ScoreRequest(q.numpy(), qm.numpy(), r.numpy(), rm.numpy())
    torch.testing.assert_close(sm.score(req), expected, atol=1e-6, rtol=0)
    rv = tm.response_values(sm, q, qm, r, rm)
    P = q.shape[1]
    torch.testing.assert_close(rv, torch.where(rm == 1, values[:, P - 1:P - 1 + r.shape[1]], 0.0),
                               atol=1e-6, rtol=0)

    sm.reward_gain, sm.reward_bias = 3.0, 0.25
    tm.save_pretrained(sm, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == [hfc.SCALAR_ARCH[arch]]
    assert cfg["ppo_rlhf"] == {"reward_gain": 3.0, "reward_bias": 0.25}
    back = tm.load_scalar_model(tmp_path / "rm")
    assert (back.reward_gain, back.reward_bias) == (3.0, 0.25)
    torch.testing.assert_close(back.score(ids, mask), sm.score(ids, mask), atol=0, rtol=0)


@torch.no_grad()
def test_score_reads_last_mask_position_not_pad_token(tiny_checkpoint):
    sm = tm.load_scalar_model(tiny_checkpoint("llama", kind="scalar"))
    ids = torch.tensor([[PAD_ID, 5, 6, EOS_ID, PAD_ID], [7, 8, 9, 10, EOS_ID]])
    ids[ids == EOS_ID] = PAD_ID  # pad id used as EOS too
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    values = sm.values(ids, mask)
    torch.testing.assert_close(sm.score(ids, mask), torch.stack([values[0, 3], values[1, 4]]),
                               atol=1e-6, rtol=0)
    assert tm.last_token_index(mask).tolist() == [3, 4]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@torch.no_grad()
def test_save_roundtrip_sharded_is_exact(tiny_checkpoint, tmp_path, arch):
    src = tiny_checkpoint(arch)
    lm = tm.load_pretrained(src)
    out = tm.save_pretrained(lm, tmp_path / "out", max_shard_bytes=40_000)
    assert (out / hfc.SAFE_WEIGHTS_INDEX_NAME).is_file() and len(hfc.weight_files(out)) > 1
    orig, saved = hfc.load_tensors(src), hfc.load_tensors(out)
    assert set(saved) == set(orig)
    for k in saved:
        np.testing.assert_array_equal(saved[k], orig[k], err_msg=k)
    mine = tm.model_tensors(lm)  # on-disk names (gpt_neox: embed_out), tied head left out
    assert set(mine) == set(orig)
    for k in mine:
        np.testing.assert_array_equal(mine[k], orig[k], err_msg=k)
    back = tm.load_pretrained(out)
    ids = _batch()[0]
    torch.testing.assert_close(back(ids), lm(ids), atol=0, rtol=0)


@torch.no_grad()
def test_bfloat16_weights_float32_logits(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")
    f32, bf16 = tm.load_pretrained(path), tm.load_pretrained(path, dtype="bfloat16")
    assert bf16.hf_model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    q, qm, r, rm = _batch()
    ids, mask = _full(q, qm, r, rm)
    a, b = f32(ids, attention_mask=mask), bf16(ids, attention_mask=mask)
    assert b.dtype == torch.float32
    err = (a - b)[mask == 1].abs().max()
    # bf16: 8 mantissa bits; see the JAX twin of this test for the bound
    assert 1e-4 < err < 0.15
    assert tm.load_pretrained(path, dtype=torch.bfloat16).hf_model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not supported"):
        tm.load_pretrained(path, dtype="float16")


@torch.no_grad()
def test_dropout_is_disabled(tiny_checkpoint):
    """A checkpoint with dropout in its config gives deterministic outputs even in train mode."""
    lm = tm.load_pretrained(tiny_checkpoint("gpt2", resid_pdrop=0.5, attn_pdrop=0.5, embd_pdrop=0.5))
    lm.train()
    ids = _batch()[0]
    torch.testing.assert_close(lm(ids), lm(ids), atol=0, rtol=0)
    raw = type(lm.hf_model).from_pretrained(str(tiny_checkpoint("gpt2", resid_pdrop=0.5, attn_pdrop=0.5,
                                                                embd_pdrop=0.5))).train()
    assert (raw(ids).logits - raw(ids).logits).abs().max() > 0  # the guard: HF's own model drops


def test_policy_with_value_head(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    pv = tm.load_pretrained(path, with_value_head=True, seed=7)
    assert isinstance(pv, tm.PolicyWithValueHead)
    np.testing.assert_array_equal(pv.value_head.weight.detach().numpy(), tm.init_score_head(64, 7))
    q, qm, r, rm = _batch(seed=6)
    ids, mask = _full(q, qm, r, rm)
    with torch.no_grad():
        logits, values = pv(ids, mask, return_values=True)
        lm = tm.load_pretrained(path)
        torch.testing.assert_close(logits, lm(ids, mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(values, pv.values(ids, mask), atol=1e-6, rtol=0)
        lp, v, ent = tm.response_logprobs_and_values(pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
        lp2, ent2 = tm.response_logprobs(pv, q, qm, r, rm, temperature=0.9, return_entropy=True)
        torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, tm.response_values(pv, q, qm, r, rm), atol=1e-6, rtol=0)
    # one backward reaches both the trunk and the value head
    logits, values = pv(ids, mask, return_values=True)
    (logits.mean() + values.mean()).backward()
    assert pv.value_head.weight.grad.abs().sum() > 0
    assert pv.lm.hf_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        pv.value_head.weight.mul_(2.0)
    tm.save_pretrained(pv, tmp_path / "pv")
    back = tm.load_pretrained(tmp_path / "pv", with_value_head=True, seed=0)
    torch.testing.assert_close(back.value_head.weight, pv.value_head.weight, atol=0, rtol=0)
    assert isinstance(tm.load_pretrained(tmp_path / "pv"), tm.CausalLM)
    with torch.no_grad():
        out, cache = pv(q, qm, use_cache=True)
    assert out.shape == (q.shape[0], q.shape[1], V) and cache.get_seq_length() == q.shape[1]


def test_errors_are_clear(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tm.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        tm.load_pretrained(tmp_path / "empty")
    src = tiny_checkpoint("gpt2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(src / "config.json", noweights / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        tm.load_pretrained(noweights)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'.*gpt2, llama, qwen2, gpt_neox"):
        tm.load_pretrained(bad)
    with pytest.raises(ValueError, match="load_scalar_model"):
        tm.load_pretrained(tiny_checkpoint("gpt2", kind="scalar"))
    with pytest.raises(ValueError, match="scalar_model_from_lm"):
        tm.load_scalar_model(src)


def test_tiny_tokenizer_loads_offline(tiny_checkpoint):
    from transformers import AutoTokenizer

    from ppo_rlhf.testing import BOS_ID, UNK_ID

    # qwen2: AutoTokenizer picks Qwen2Tokenizer, which would add its own unk token past the vocab
    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint("qwen2")))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok.padding_side == "left" and 260 <= len(tok) <= V
    text = "Héllo wörld! The answer is 42."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips
    enc = tok(["short", "a much longer prompt here"], padding=True)
    assert enc["attention_mask"][0][0] == 0 and enc["input_ids"][0][0] == PAD_ID  # left padding


def test_make_padded_batch_layout():
    q, qm, r, rm = make_padded_batch(0, 5, 6, 4, V, min_prompt_len=2)
    assert q.dtype == np.int32 and q.shape == (5, 6) and r.shape == (5, 4)
    assert qm[0].all() and qm[1].sum() == 2 and rm[0].all() and rm[1].sum() == 1
    for b in range(5):  # masks: contiguous suffix (prompts) / prefix (responses)
        assert (np.diff(qm[b]) >= 0).all() and (np.diff(rm[b]) <= 0).all()
    assert (q[qm == 0] == PAD_ID).all() and (q[qm == 1] >= 4).all() and (r[rm == 0] == PAD_ID).all()
