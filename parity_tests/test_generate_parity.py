"""ppo_jax.generate vs ppo_torch.generate on the same tiny random checkpoints of every architecture:
greedy decoding and shared-noise sampling give identical tokens, masks and pads, and log-probs
equal to float32 tolerance, on batches mixing prompt lengths (left padding, a 1-token prompt) and
rows that hit EOS early.

Why identical tokens are a fair expectation, and how near-ties are handled: the two backends'
float32 logits differ by ~2e-6 (test_models_parity; both compute the same arithmetic in a
different order). A token can only flip where the top two candidates -- logits for greedy,
filtered logits / T + Gumbel noise for sampling -- are within that difference of each other (or
where a top-p cut-off falls within float32 rounding of a cumulative mass, as unlikely). Each
test measures the top-2 margin along the whole generated path (one full torch forward of the
final sequence) and requires it to exceed MIN_MARGIN = 1e-4 = 50x the observed logit
difference. With random weights the smallest gap over ~150 positions is typically 1e-4 .. 1e-3
(prompt/noise seeds 10-19 gave 6e-5 .. 1.8e-3); SEED was chosen for a comfortable 1.7e-3, so
the token comparison tests the implementations and not luck with ties. Should a change of
fixtures land on a near-tie, the margin assertion says so instead of a puzzling token mismatch.

Log-probs: compared at F32_ATOL = 1e-4 (the model parity tolerance for float32 logits; a
log-prob is logit / T - logsumexp, observed difference ~2e-6).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_jax.generate import generate as jgenerate
from ppo_rlhf.sampling import apply_eos, filter_logits, gumbel_noise
from ppo_rlhf.testing import PAD_ID, make_padded_batch
from ppo_torch.generate import generate as tgenerate

ARCHS = ("gpt2", "llama", "qwen2", "gpt_neox")
V = 512
F32_ATOL = 1e-4
MIN_MARGIN = 1e-4
SEED = 15  # prompts and noise; smallest margin over all archs and paths: 1.7e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
    # CPU matmuls are full float32 anyway; on GPU JAX's default may use TF32 (torch's does not)
    with jax.default_matmul_precision("float32"):
        yield


def _models(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    return jm.load_pretrained(path), tm.load_pretrained(path)


def _prompts(seed, B=4, P=9):
    q, qm, _, _ = make_padded_batch(seed, B, P, 1, V, min_prompt_len=1)
    return q, qm


def _run_both(jlm, tlm, q, qm, **kw):
    j = jgenerate(jlm, q, qm, **kw)
    t = tgenerate(tlm, q, qm, **kw)
    return tuple(np.asarray(x) for x in j), tuple(x.numpy() for x in t)


def _response_logits(tlm, q, qm, ids, mask):
    """Float32 logits [B, N, V] that chose each response token (one full forward in torch)."""
    seq = torch.from_numpy(np.concatenate([q, ids.astype(q.dtype)], 1)).long()
    m = torch.from_numpy(np.concatenate([qm, mask.astype(qm.dtype)], 1)).long()
    with torch.no_grad():
        logits = tlm(seq, attention_mask=m).numpy()
    P, N = q.shape[1], ids.shape[1]
    return logits[:, P - 1: P - 1 + N]


def _margin(scores, mask):
    """Smallest gap between the best and second-best score over the real response positions."""
    top2 = -np.sort(-scores, axis=-1)[..., :2]
    gap = top2[..., 0] - top2[..., 1]
    return float(gap[mask == 1].min())


def _assert_same(j, t, what):
    np.testing.assert_array_equal(j[1], t[1], err_msg=f"{what}: response_mask")
    np.testing.assert_array_equal(j[0], t[0], err_msg=f"{what}: response_ids")
    np.testing.assert_allclose(j[2], t[2], rtol=0, atol=F32_ATOL, err_msg=f"{what}: logprobs")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_identical(tiny_checkpoint, arch):
    jlm, tlm = _models(tiny_checkpoint, arch)
    q, qm = _prompts(seed=SEED)
    N = 40
    j, t = _run_both(jlm, tlm, q, qm, max_new_tokens=N, greedy=True, temperature=0.8)
    logits = _response_logits(tlm, q, qm, t[0], t[1])
    margin = _margin(logits, t[1])
    assert margin > MIN_MARGIN, f"near-tie in the greedy path (margin {margin:.2e}): pick another seed"
    _assert_same(j, t, f"{arch} greedy")
    assert t[1].all() and t[0].shape == (4, N)
    np.testing.assert_array_equal(t[0], logits.argmax(-1))  # greedy really is argmax


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_noise_sampling_identical_with_eos(tiny_checkpoint, arch):
    """Same Gumbel noise => same samples, with and without top-k / top-p, and with an EOS that
    stops row 0 early (the others run on; finished rows are padded with PAD_ID)."""
    jlm, tlm = _models(tiny_checkpoint, arch)
    q, qm = _prompts(seed=SEED)
    B, N = q.shape[0], 32
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_k=40, top_p=0.9)):
        noise = gumbel_noise(10 * SEED + len(kw), B, N, V)
        opts = dict(max_new_tokens=N, noise=noise, pad_token_id=PAD_ID, **kw)
        # pick an EOS that row 0 emits at step 4 without stopping (the torch reference run);
        # the same noise makes the same tokens up to there
        full = tuple(x.numpy() for x in tgenerate(tlm, q, qm, **opts))
        eos = int(full[0][0, 4])
        j, t = _run_both(jlm, tlm, q, qm, eos_token_id=eos, **opts)
        filt = filter_logits(_response_logits(tlm, q, qm, t[0], t[1]), **kw)
        margin = _margin(filt + noise, t[1])
        assert margin > MIN_MARGIN, f"near-tie in the sampled path (margin {margin:.2e})"
        _assert_same(j, t, f"{arch} {kw}")
        want = apply_eos(full[0], full[2], eos, PAD_ID)
        for got, exp in zip(t, want):
            np.testing.assert_array_equal(got, exp)
        assert t[1][0].sum() <= 5 and (t[0][0, 5:] == PAD_ID).all() and (t[2][0, 5:] == 0).all()
        assert (t[1].sum(1) == N).any()  # and a row that ran to the end
