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


def noise_with_eos(vocab: int, iteration: int, rows: int = B) -> np.ndarray:
    noise = gumbel_noise(1000 + iteration, rows, N, vocab)
    noise[:, :, EOS_ID] = -30.0
    noise[iteration % B, 2 + iteration % 3, EOS_ID] = 30.0       # stops early
    noise[(iteration + 2) % B, N - 2, EOS_ID] = 30.0             # stops one before the end
    return noise


def inputs(vocab: int, iteration: int, num_generations: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_ids, query_mask, noise) of an iteration: B left-padded prompts of mixed lengths, and
    the noise of their B * num_generations responses."""
    q, qm, _, _ = make_padded_batch(100 + iteration, B, P, 1, vocab_size=vocab)
    return q, qm, noise_with_eos(vocab, iteration, B * num_generations)


def x64_if(dtype: str):
    """JAX's 64-bit mode for a float64 run (trainer construction, steps and reading results)."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def weights(trainer) -> dict[str, np.ndarray]:
    """policy.<HF name> and critic.<HF name> -> array (a shared-trunk critic is the policy),
    a LoRA model's adapters included (policy.<module>.lora_A.weight, PEFT names and layout)."""
    if trainer.backend == "jax":
        from ppo_jax.models import model_options, model_tensors
        from ppo_jax.models.lora import adapter_tensors
    else:
        from ppo_torch.models import model_options, model_tensors
        from ppo_torch.models.lora import adapter_tensors

    def tensors(model):
        lora = adapter_tensors(model) if model_options(model).lora else {}
        return {**model_tensors(model), **lora}

    out = {f"policy.{k}": v for k, v in tensors(trainer.policy_model()).items()}
    if not trainer.shared_trunk and trainer.critic_model() is not None:  # None: critic-free
        out.update({f"critic.{k}": v for k, v in tensors(trainer.critic_model()).items()})
    return out


# ---- tolerances (see test_ppo_parity.py) -------------------------------------------------------------
TOL = {
    # same weights: float64 rounding only
    ("float64", "start"): dict(rtol=1e-11, atol=1e-12),
    ("float64", "later"): dict(rtol=1e-10, atol=1e-11),
    # float32, same weights (the first rollout: one forward pass): matmuls round differently per op
    # (~1e-7 relative). After an update nothing is compared to a fixed float32 tolerance: see
    # `explained_by_rounding`.
    ("float32", "start"): dict(rtol=1e-5, atol=2e-6),
}
WEIGHT_TOL_F64 = 1e-11   # absolute, per entry
# the float32 runs' error against their float64 twins, pooled over the later rollouts' log-probs
# and values: neither backend's may exceed the other's by more than this factor (`accuracy_balance`)
ACCURACY_RATIO = 3.0


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def compare_arrays(a: dict, b: dict, dtype: str, stage: str, what: str = "") -> None:
    tol = TOL[(dtype, stage)]
    for k in a:
        np.testing.assert_allclose(_f64(a[k]), _f64(b[k]), err_msg=f"{what} {k}", **tol)


def same_tokens(*rollouts: dict) -> None:
    """The sampled tokens of every run (both backends, both precisions) are identical: without
    that no comparison below would compare the same computation."""
    for r in rollouts[1:]:
        np.testing.assert_array_equal(rollouts[0]["response_ids"], r["response_ids"], err_msg="sampled tokens differ")
        np.testing.assert_array_equal(rollouts[0]["response_mask"], r["response_mask"])


ROLLOUT_KEYS = ("logprobs", "ref_logprobs", "values", "scores")


def compare_rollouts(ra, rb, dtype: str, stage: str) -> None:
    same_tokens(ra, rb)
    compare_arrays({k: ra[k] for k in ROLLOUT_KEYS}, rb, dtype, stage, "rollout")


def stat_keys(s: dict, keys=None) -> list[str]:
    return [k for k in (s if keys is None else keys) if not k.startswith("time/")]


def compare_stats(sa: dict, sb: dict, dtype: str, stage: str, keys=None, what: str = "") -> None:
    """Float64 stats (those of the update average K x M optimiser steps) at the float64
    tolerance of their stage."""
    assert dtype == "float64", "float32 stats after an update: explained_by_rounding"
    for k in stat_keys(sa, keys):
        np.testing.assert_allclose(sa[k], sb[k], err_msg=f"{what} stat {k}", **TOL[(dtype, stage)])


def compare_weights(wa: dict, wb: dict, start: dict, keys=None) -> float:
    """Float64 weights: every entry to WEIGHT_TOL_F64. Returns how far they moved (max |w - start|)."""
    keys = list(wa if keys is None else keys)
    moved = max(float(np.abs(_f64(wa[k]) - start[k]).max()) for k in keys)
    worst = max(float(np.abs(_f64(wa[k]) - _f64(wb[k])).max()) for k in keys)
    assert worst < WEIGHT_TOL_F64, f"updated weights differ by {worst:.2e} (moved {moved:.2e})"
    return moved


# ---- float32 after an update: a tolerance made of the rounding it absorbs -------------------------
def explained_by_rounding(a32, b32, a64, b64, *, rtol: float, atol: float, what: str = "") -> None:
    """Float32 results of two programs A and B after optimiser steps, each next to its own
    float64 twin (the same program, inputs and steps in float64), compared entry by entry:

        |a32 - b32| <= |a32 - a64| + |b32 - b64| + atol + rtol * |b64|

    The right side is the float32 rounding error of each run, measured on this machine, plus the
    tolerance to which the float64 twins themselves agree (a64 ~ b64: the float64 parity of the
    same test, asserted with the same `rtol` / `atol`). By the triangle inequality,
    |a32 - b32| <= |a32 - a64| + |a64 - b64| + |b64 - b32|, so rounding alone can never exceed
    the bound, however much the kernels, libraries or CPU of the day amplify it: a statistic
    that is sensitive (a variance of importance ratios after several AdamW steps) gets a bound
    that is sensitive too, and an entry of a weight whose gradient passes near 0 (Adam turns its
    rounding into a visibly different step) gets its own large bound, while every other entry
    keeps a tight one. The factor in front of the rounding errors is 1, the smallest that no
    rounding can break; a larger one would only let bugs through.

    What fails it: a32 and b32 further apart than their own rounding explains, i.e. A and B
    compute different things in BOTH precisions (a planted mutant: `tools/mutants.py`). What it
    cannot see is an error that only one precision has (one backend less accurate in float32):
    its own rounding term grows with it. That is what `accuracy_balance` and the fixed float32
    tolerance of the first forward pass (identical weights, `TOL[("float32", "start")]`) are for."""
    a32, b32, a64, b64 = (_f64(x) for x in (a32, b32, a64, b64))
    bound = np.abs(a32 - a64) + np.abs(b32 - b64) + atol + rtol * np.abs(b64)
    over = np.abs(a32 - b32) - bound
    if np.any(over > 0):
        i = np.unravel_index(int(np.argmax(over)), over.shape) if over.ndim else ()
        raise AssertionError(
            f"{what}: float32 results differ by {abs(a32 - b32)[i]:.3e} at {i}, more than their own "
            f"float32 rounding explains (|a32-a64| {abs(a32 - a64)[i]:.3e} + |b32-b64| "
            f"{abs(b32 - b64)[i]:.3e} + floor {(atol + rtol * abs(b64))[i]:.1e}); float64 twins "
            f"{a64[i]!r} vs {b64[i]!r}")


def explained_stats(sa32: dict, sb32: dict, sa64: dict, sb64: dict, stage: str, keys=None,
                    what: str = "") -> None:
    for k in stat_keys(sa32, keys):
        explained_by_rounding(sa32[k], sb32[k], sa64[k], sb64[k], **TOL[("float64", stage)],
                              what=f"{what} stat {k}")


def explained_weights(wa32: dict, wb32: dict, wa64: dict, wb64: dict, keys=None, what: str = "") -> None:
    for k in (wa32 if keys is None else keys):
        explained_by_rounding(wa32[k], wb32[k], wa64[k], wb64[k], rtol=0.0, atol=WEIGHT_TOL_F64,
                              what=f"{what} weight {k}")


def rounding_error(x32, x64) -> float:
    """sqrt(sum (x32 - x64)^2) over every entry of the given arrays (lists of arrays)."""
    return float(np.sqrt(sum(np.sum((_f64(a) - _f64(b)) ** 2) for a, b in zip(x32, x64))))


def accuracy_balance(err_a: float, err_b: float, what: str = "") -> None:
    """Neither backend's float32 error against its own float64 twin, pooled over many entries,
    exceeds the other's by more than ACCURACY_RATIO. Both do the same float32 arithmetic in
    different orders, so their errors are of one size: pooled over the later iterations'
    log-probs and values of the four configurations of test_ppo_parity, 1.0-1.6x with the
    machine's own kernels and under each of `tools/kernel_variants.py`'s variants, at XLA -O0
    and -O2 (README "Parity"). An error that only one backend makes in float32 shows as a ratio
    far from 1 and fails here although `explained_by_rounding` absorbs it: optax's float32 Adam
    bias correction (1 - 0.999^t from 0.999 rounded to float32: every JAX step ~1e-5 short, the
    same sign on every weight) gave 5.7-9.0x, and was the cause of a float32 parity failure
    (`ppo_jax/optim.py`)."""
    ratio = max(err_a, err_b) / max(min(err_a, err_b), 1e-300)
    assert ratio <= ACCURACY_RATIO, (
        f"{what}: one backend's float32 error against its float64 twin is {ratio:.1f}x the other's "
        f"({err_a:.3e} vs {err_b:.3e}): an error only one of them makes in float32")


def twins_within_rounding(wa32: dict, wb32: dict, wa64: dict, wb64: dict, what: str = "") -> None:
    """For a model whose float64 run is not float64 throughout (transformers computes the RMSNorm
    and the rotary tables of Llama-family models in float32 even for float64 weights) the
    float64 twins A and B differ by those float32 islands: a few of the operations that the
    float32 runs a and b round, all of them. Pooled over every weight entry, the twins'
    difference must stay below the float32 runs' own rounding:
    ||A - B|| <= ||a - A|| + ||b - B|| (measured 0.17-0.2 of it on tiny Llama checkpoints). A bug
    in either backend's arithmetic moves A away from B by far more. Not per entry: the islands'
    error and the float32 error of one entry are two different draws of rounding."""
    keys = list(wb64)
    twins = rounding_error([wa64[k] for k in keys], [wb64[k] for k in keys])
    own = (rounding_error([wa32[k] for k in keys], [wa64[k] for k in keys])
           + rounding_error([wb32[k] for k in keys], [wb64[k] for k in keys]))
    assert twins <= own, (f"{what}: the float64 twins differ by {twins:.3e}, more than the float32 "
                          f"runs' own rounding ({own:.3e})")
