"""What the whole-iteration parity tests share: prompts and sampling noise in which EOS is really
sampled, the trainers' weights under Hugging Face names, and the comparisons with their
tolerances (explained in `test_ppo_parity.py`'s docstring).

EOS on purpose: the tiny random models almost never sample a given token by chance, so the noise
decides. `noise_with_eos` sets the EOS column of the Gumbel noise to -30 (never sampled) except
at two (row, step) pairs per iteration where it is +30 (always sampled: |logits / T| < 10 here).
Every iteration then has responses that stop early and responses that run to full length
(0 < eos_frac < 1), so masking after EOS, the missing-EOS penalty on some rows only, unequal
real-token counts across micro-batches and seq-mean-token-mean != token-mean are all exercised.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from ppo_rlhf.sampling import gumbel_noise
from ppo_rlhf.testing import EOS_ID, make_padded_batch

B, P, N = 4, 6, 8


def noise_with_eos(vocab: int, iteration: int) -> np.ndarray:
    noise = gumbel_noise(1000 + iteration, B, N, vocab)
    noise[:, :, EOS_ID] = -30.0
    noise[iteration % B, 2 + iteration % 3, EOS_ID] = 30.0       # stops early
    noise[(iteration + 2) % B, N - 2, EOS_ID] = 30.0             # stops one before the end
    return noise


def inputs(vocab: int, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_ids, query_mask, noise) of an iteration: left-padded prompts of mixed lengths."""
    q, qm, _, _ = make_padded_batch(100 + iteration, B, P, 1, vocab_size=vocab)
    return q, qm, noise_with_eos(vocab, iteration)


def x64_if(dtype: str):
    """JAX's 64-bit mode for a float64 run (trainer construction, steps and reading results)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def weights(trainer) -> dict[str, np.ndarray]:
    """policy.<HF name> and critic.<HF name> -> array (a shared-trunk critic is the policy)."""
    if trainer.backend == "jax":
        from ppo_jax.models import model_tensors
    else:
        from ppo_torch.models import model_tensors
    out = {f"policy.{k}": v for k, v in model_tensors(trainer.policy_model()).items()}
    if not trainer.shared_trunk:
        out.update({f"critic.{k}": v for k, v in model_tensors(trainer.critic_model()).items()})
    return out


# ---- tolerances (see test_ppo_parity.py) -------------------------------------------------------------
TOL = {
    # same weights: float64 rounding only
    ("float64", "start"): dict(rtol=1e-11, atol=1e-12),
    ("float64", "later"): dict(rtol=1e-10, atol=1e-11),
    # float32: matmuls round differently per op (~1e-7 relative); later iterations run on weights
    # that differ by the float32 rounding of the updates
    ("float32", "start"): dict(rtol=1e-5, atol=2e-6),
    ("float32", "later"): dict(rtol=1e-4, atol=5e-5),
}
WEIGHT_TOL_F64 = 1e-11   # absolute, per entry
UPDATE_TOL_F32 = 2e-3    # |dW_a - dW_b| / |dW| per tensor, float32


def compare_arrays(a: dict, b: dict, dtype: str, stage: str, what: str = "") -> None:
    tol = TOL[(dtype, stage)]
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                                   err_msg=f"{what} {k}", **tol)


def compare_rollouts(ra, rb, dtype: str, stage: str) -> None:
    np.testing.assert_array_equal(ra["response_ids"], rb["response_ids"], err_msg="sampled tokens differ")
    np.testing.assert_array_equal(ra["response_mask"], rb["response_mask"])
    compare_arrays({k: ra[k] for k in ("logprobs", "ref_logprobs", "values", "scores")},
                   rb, dtype, stage, "rollout")


def compare_stats(sa: dict, sb: dict, dtype: str, stage: str, keys=None, what: str = "") -> None:
    """Stats at twice the arrays' relative tolerance: the update's stats (policy/approxkl_avg,
    loss/*_avg, ...) average K x M optimiser steps, all but the first of them computed on
    weights that already differ by the float32 rounding of the earlier updates of the same
    iteration (measured up to 1.3e-5 relative on approxkl, with torch and XLA on one thread)."""
    keys = [k for k in (sa if keys is None else keys) if not k.startswith("time/")]
    tol = dict(TOL[(dtype, stage)])
    tol["rtol"] *= 2
    for k in keys:
        np.testing.assert_allclose(sa[k], sb[k], err_msg=f"{what} stat {k}", **tol)


def compare_weights(wa: dict, wb: dict, start: dict, dtype: str, keys=None) -> float:
    """float64: every entry to WEIGHT_TOL_F64; float32: every tensor's update in norm to
    UPDATE_TOL_F32 of its size. Returns how far the weights moved (max |w - start|)."""
    keys = list(wa if keys is None else keys)
    moved = max(float(np.abs(np.asarray(wa[k], np.float64) - start[k]).max()) for k in keys)
    if dtype == "float64":
        worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in keys)
        assert worst < WEIGHT_TOL_F64, f"updated weights differ by {worst:.2e} (moved {moved:.2e})"
    else:
        rel = {}
        for k in keys:
            da, db = (np.asarray(w[k], np.float64) - start[k] for w in (wa, wb))
            size = float(np.linalg.norm(db))
            rel[k] = float(np.linalg.norm(da - db)) / size if size > 0 else float(np.abs(da).max() > 0)
        worst = max(rel, key=rel.get)
        assert rel[worst] < UPDATE_TOL_F32, f"{worst}: updates differ by {rel[worst]:.2e} of their size"
    return moved
