"""Unit tests of what only ppo_torch.models has: autograd through the models, transformers' cache
and dropout, the tiny tokenizer. Both cores' shared tests: tests/test_models.py; cross-backend
equality: parity_tests/test_models_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ppo_torch.models as tm
from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512


def _batch(seed=0, B=3, P=7, R=5):
    return tuple(torch.from_numpy(x) for x in make_padded_batch(seed, B, P, R, V))


def _full(q, qm, r, rm):
    return torch.cat([q, r], 1), torch.cat([qm, rm], 1)


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


def test_response_logprobs_has_gradients(tiny_checkpoint):
    lm = tm.load_pretrained(tiny_checkpoint("llama"))
    q, qm, r, rm = _batch()
    tm.response_logprobs(lm, q, qm, r, rm).sum().backward()
    g = lm.hf_model.model.layers[0].self_attn.q_proj.weight.grad
    assert g is not None and g.abs().sum() > 0


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


def test_policy_with_value_head_backward_and_cache(tiny_checkpoint):
    """One backward reaches both the trunk and the value head; the policy takes transformers'
    cache (the rest of its tests, both cores: tests/test_models.py)."""
    pv = tm.load_pretrained(tiny_checkpoint("llama"), with_value_head=True, seed=7)
    q, qm, r, rm = _batch(seed=6)
    ids, mask = _full(q, qm, r, rm)
    logits, values = pv(ids, mask, return_values=True)
    (logits.mean() + values.mean()).backward()
    assert pv.value_head.weight.grad.abs().sum() > 0
    assert pv.lm.hf_model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out, cache = pv(q, qm, use_cache=True)
    assert out.shape == (q.shape[0], q.shape[1], V) and cache.get_seq_length() == q.shape[1]


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
