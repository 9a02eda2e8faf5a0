"""Generation in both cores (through `parity_tests.backends.ModelCore`): the filtering rule on
hand-made logits, EOS / masks / pads, the single-step and shared-trunk cases, bad arguments. What
only one core has -- JAX keys, jit and no recompilation; torch generators and tensors -- is in
tests/test_generate_jax.py and tests/test_generate_torch.py; cross-backend equality of sampled
tokens in parity_tests/test_generate_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.backends import MODEL_CORES
from ppo_rlhf import sampling as nz
from ppo_rlhf.testing import make_padded_batch

V = 512
cores = pytest.mark.parametrize("core", MODEL_CORES, ids=lambda c: c.name)
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _gpt2(core, tiny_checkpoint):
    if core.name not in _MODELS:
        _MODELS[core.name] = core.models.load_pretrained(tiny_checkpoint("gpt2"))
    return _MODELS[core.name]


def _batch(seed=0, B=4, P=7):
    q, qm, _, _ = make_padded_batch(seed, B, P, 1, V)  # mixed prompt lengths, row 1 has 1 token
    return q, qm


@cores
def test_filters_on_hand_made_logits(core):
    x = np.log(np.asarray([[0.5, 0.25, 0.125, 0.0625, 0.0625]], np.float32))
    filt = core.generation.filter_logits

    def keep(**kw):
        return np.isfinite(core.run(filt, x, **kw))[0].tolist()

    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_k=5) == [True] * 5
    # nucleus: the smallest prefix with mass >= p
    assert keep(top_p=0.5) == [True, False, False, False, False]
    assert keep(top_p=0.51) == [True, True, False, False, False]
    assert keep(top_p=0.75) == [True, True, False, False, False]
    assert keep(top_p=0.8) == [True, True, True, False, False]
    assert keep(top_p=1e-6) == [True, False, False, False, False]  # the top token is kept
    # the last two are tied: keeping one keeps both, whatever order a sort puts them in
    assert keep(top_p=0.9) == [True] * 5
    # top-p runs on the top-k-renormalised distribution: {0.5, 0.25, 0.125} / 0.875
    assert keep(top_k=3, top_p=0.8) == [True, True, False, False, False]
    assert keep(top_k=3, top_p=0.86) == [True, True, True, False, False]
    # ties at the k-th value are kept
    t = np.asarray([[3.0, 1.0, 3.0, 2.0]], np.float32)
    assert np.isfinite(core.run(filt, t, top_k=1))[0].tolist() == [True, False, True, False]
    # kept logits are unchanged
    np.testing.assert_array_equal(core.run(filt, x, top_k=2)[0, :2], x[0, :2])


@cores
@pytest.mark.parametrize("source", ["greedy", "noise", "random"])
def test_eos_ends_a_row_pads_after(core, tiny_checkpoint, source):
    gpt2 = _gpt2(core, tiny_checkpoint)
    q, qm = _batch(seed=1)
    N = 10

    def rand():  # a fresh seeded source for each of the two runs
        return dict(greedy=dict(greedy=True), noise=dict(noise=nz.gumbel_noise(5, 4, N, V)),
                    random=core.random(5))[source]

    ids0, _, lps0 = core.generate(gpt2, q, qm, max_new_tokens=N, **rand())
    eos, pad = int(ids0[0, 3]), 7
    out = core.generate(gpt2, q, qm, max_new_tokens=N, eos_token_id=eos, pad_token_id=pad, **rand())
    want = nz.apply_eos(ids0, lps0, eos, pad)
    for got, exp, name in zip(out, want, ("ids", "mask", "logprobs")):
        np.testing.assert_array_equal(got, exp, err_msg=name)
    assert out[1][0].sum() <= 4 and out[0][0, -1] == pad
    # masks are contiguous prefixes, at least one token long; the last real token of a row that
    # stopped is the EOS
    m = out[1]
    assert (np.diff(m, axis=1) <= 0).all() and m[:, 0].all()
    stopped = m.sum(1) < N
    assert (out[0][stopped, m[stopped].sum(1) - 1] == eos).all()


@cores
def test_every_row_finishes_early(core, tiny_checkpoint):
    """All rows hit EOS at step 0: the loop leaves at once; shapes stay static."""
    gpt2 = _gpt2(core, tiny_checkpoint)
    q, qm = _batch(seed=3)
    first = core.generate(gpt2, q, qm, max_new_tokens=1, greedy=True)[0][:, 0]
    out = core.generate(gpt2, q[:1], qm[:1], max_new_tokens=16, greedy=True, eos_token_id=int(first[0]),
                        pad_token_id=5)
    assert out[0].shape == (1, 16)
    assert out[0][0, 0] == first[0] and (out[0][0, 1:] == 5).all()
    assert out[1].tolist() == [[1] + [0] * 15] and (out[2][0, 1:] == 0).all() and out[2][0, 0] < 0


@cores
def test_single_new_token_and_policy_with_value_head(core, tiny_checkpoint):
    gpt2 = _gpt2(core, tiny_checkpoint)
    q, qm = _batch(seed=3)
    pv = core.models.load_pretrained(tiny_checkpoint("gpt2"), with_value_head=True)
    a = core.generate(gpt2, q, qm, max_new_tokens=1, greedy=True)
    b = core.generate(pv, q, qm, max_new_tokens=1, greedy=True)
    assert a[0].shape == (4, 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    logits = core.run(gpt2, q, attention_mask=qm)[:, -1]
    np.testing.assert_array_equal(a[0][:, 0], logits.argmax(-1))


@cores
def test_bad_arguments(core, tiny_checkpoint):
    gpt2 = _gpt2(core, tiny_checkpoint)
    generate = core.generation.generate
    q, qm = _batch()
    ok = dict(max_new_tokens=4, greedy=True)
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
                    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                    (dict(eos_token_id=-1), "eos_token_id")]:
        with pytest.raises(ValueError, match=msg):
            generate(gpt2, q, qm, **{**ok, **kw})
    with pytest.raises(ValueError, match="noise must be"):
        generate(gpt2, q, qm, max_new_tokens=4, noise=np.zeros((4, 3, V), np.float32))
    with pytest.raises(ValueError, match="vocab dimension"):
        generate(gpt2, q, qm, max_new_tokens=4, noise=np.zeros((4, 4, V - 1), np.float32))
    with pytest.raises(ValueError, match="left padding"):
        generate(gpt2, q, qm[:, ::-1].copy(), **ok)  # right-padded prompts
    empty = qm.copy()
    empty[2] = 0
    with pytest.raises(ValueError, match="no real token"):
        generate(gpt2, q, empty, **ok)
    with pytest.raises(ValueError, match="must match"):
        generate(gpt2, q, qm[:, 1:], **ok)
