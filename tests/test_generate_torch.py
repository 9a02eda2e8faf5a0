"""What only ppo_torch.generate has: generators and torch's global RNG, tensor inputs without autograd,
log-probs equal to a full forward, bfloat16. Both cores' shared tests: tests/test_generate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ppo_torch.models as tm
from ppo_rlhf import sampling as nz
from ppo_rlhf.testing import make_padded_batch
from ppo_torch.generate import GenerationOutput, filter_logits, generate, sample_token

V = 512


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _np(out: GenerationOutput):
    return tuple(x.numpy() for x in out)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the rule on hand-made logits ---------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(top_k=7), dict(top_p=0.6),
                                dict(temperature=1.7, top_k=40, top_p=0.9), dict(greedy=True)])
def test_sample_token_matches_numpy_reference(kw):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 100)) * 2).astype(np.float32)
    g = nz.gumbel_noise(1, 64, 1, 100)[:, 0]
    tok, lp = sample_token(torch.from_numpy(logits), torch.from_numpy(g), **kw)
    ref_tok, ref_lp = nz.sample_reference(logits, g, **kw)
    np.testing.assert_array_equal(tok.numpy(), ref_tok)
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=0, atol=2e-6)
    sub = {k: v for k, v in kw.items() if k != "greedy"}
    T = kw.get("temperature", 1.0)
    np.testing.assert_array_equal(  # torch divides exactly as numpy does
        filter_logits(torch.from_numpy(logits) / T, kw.get("top_k", 0), kw.get("top_p", 1.0)).numpy(),
        nz.filter_logits(logits, **sub))


@pytest.mark.parametrize("kw", [dict(temperature=0.5), dict(temperature=2.0, top_k=3),
                                dict(top_p=0.7)])
def test_generator_sampling_follows_the_filtered_distribution(kw):
    """Monte Carlo through generate's own Gumbel draws: frequencies = softmax(filtered)."""
    from ppo_torch.generate import _gumbel

    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 40000
    g = _gumbel(_gen(3), (n, 6), "cpu")
    tok, lp = sample_token(logits.expand(n, 6), g, **kw)
    freq = np.bincount(tok.numpy(), minlength=6) / n
    f = nz.filter_logits(logits.numpy(), **kw)
    p = np.exp(f - f.max())
    p /= p.sum()
    np.testing.assert_allclose(freq, p, atol=0.0125)  # binomial s.e. <= 0.0025; 5 sigma
    assert np.all(freq[p == 0] == 0)
    full = torch.log_softmax(logits / kw.get("temperature", 1.0), -1)
    np.testing.assert_allclose(lp.numpy(), full[tok].numpy(), atol=1e-6)


# ---- with a model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2(tiny_checkpoint):
    return tm.load_pretrained(tiny_checkpoint("gpt2"))


def _batch(seed=0, B=4, P=7):
    q, qm, _, _ = make_padded_batch(seed, B, P, 1, V)  # mixed prompt lengths, row 1 has 1 token
    return q, qm


def _ref_logprobs(model, q, qm, ids, mask, temperature):
    with torch.no_grad():
        return tm.response_logprobs(model, torch.from_numpy(q), torch.from_numpy(qm),
                                    torch.as_tensor(ids), torch.as_tensor(mask),
                                    temperature=temperature).numpy()


def test_logprobs_equal_full_forward_and_generator_determinism(gpt2):
    q, qm = _batch()
    kw = dict(max_new_tokens=12, temperature=0.7, top_k=50, eos_token_id=None)
    a = _np(generate(gpt2, q, qm, generator=_gen(1), **kw))
    b = _np(generate(gpt2, q, qm, generator=_gen(1), **kw))
    g = _gen(1)
    generate(gpt2, q, qm, generator=g, **kw)
    c = _np(generate(gpt2, q, qm, generator=g, **kw))  # the generator advanced
    torch.manual_seed(4)
    d = _np(generate(gpt2, q, qm, **kw))  # generator=None: torch's global RNG
    torch.manual_seed(4)
    e = _np(generate(gpt2, q, qm, **kw))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(d, e):
        np.testing.assert_array_equal(x, y)
    assert (a[0] != c[0]).mean() > 0.5 and (a[0] != d[0]).mean() > 0.5
    ids, mask, lps = a
    assert ids.dtype == np.int64 and mask.dtype == np.int32 and lps.dtype == np.float32
    assert ids.shape == mask.shape == lps.shape == (4, 12) and mask.all()
    ref = _ref_logprobs(gpt2, q, qm, ids, mask, 0.7)  # cache vs full forward: float32 rounding
    np.testing.assert_allclose(lps, ref, rtol=0, atol=1e-5)


def test_tensor_inputs_and_no_autograd(gpt2):
    q, qm = _batch(seed=8)
    out = generate(gpt2, torch.from_numpy(q), torch.from_numpy(qm), max_new_tokens=4,
                   noise=torch.from_numpy(nz.gumbel_noise(0, 4, 4, V)))
    ref = generate(gpt2, q, qm, max_new_tokens=4, noise=nz.gumbel_noise(0, 4, 4, V))
    assert torch.equal(out.response_ids, ref.response_ids)
    assert not out.logprobs.requires_grad and not gpt2.training


@pytest.mark.parametrize("arch", ["llama"])  # grouped-query attention, RoPE
def test_bfloat16(tiny_checkpoint, arch):
    """bf16 weights and activations (HF's KV cache in bf16); float32 logits, sampling, log-probs."""
    lm = tm.load_pretrained(tiny_checkpoint(arch), dtype="bfloat16")
    q, qm = _batch(seed=7)
    out = generate(lm, q, qm, max_new_tokens=10, temperature=0.8, generator=_gen(0))
    assert out.logprobs.dtype == torch.float32
    ids, mask, lps = _np(out)
    assert np.isfinite(lps).all() and (lps < 0).all()
    # Recomputed by one full bf16 forward: torch's CPU bf16 matmuls and SDPA kernels block a
    # [B, 1] decode step differently from the [B, P + N] sequence, so hidden states differ by
    # bf16 ulps (2^-8 relative) and the float32 log-probs by a few 1e-2 through 2 layers
    # (observed <= 0.034 over 4 archs x 3 seeds); 0.1 still catches a wrong cache slot or mask
    # (O(1) shifts: log-probs here are ~ -6 +- 1).
    ref = _ref_logprobs(lm, q, qm, ids, mask, 0.8)
    np.testing.assert_allclose(lps, ref, rtol=0, atol=0.1)
    lm32 = tm.load_pretrained(tiny_checkpoint(arch))
    assert np.abs(_ref_logprobs(lm32, q, qm, ids, mask, 0.8) - lps).max() > 1e-3  # really bf16
