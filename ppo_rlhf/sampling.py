"""Sampling: the rule both backends implement, its argument checks, a plain numpy reference of
it, the Gumbel noise that lets the two backends draw the SAME tokens, and `TextSamples` -- what
each backend's `sample_text.sample_texts` (responses to text prompts, for evaluation, SFT samples
and the labelling tools) returns.

The rule (`ppo_jax.generate` and `ppo_torch.generate` implement exactly this):

    scaled   = logits / temperature                       # float32, [B, V]
    filtered = top_p_filter(top_k_filter(scaled, k), p)   # dropped tokens set to -inf
    token    = argmax(filtered + gumbel)                  # gumbel: standard Gumbel draws, [B, V]
    greedy   : token = argmax(logits)                     # no noise, no filter
    logprob  = log_softmax(scaled)[token]                 # the UNFILTERED temperature distribution

argmax(x + Gumbel) is an exact sample of softmax(x) (the Gumbel-max trick), so with the same
`gumbel` array two implementations whose logits agree to float32 rounding pick the same token
unless two candidates' perturbed scores are within that rounding of each other (probability
~1e-5 per token with continuous noise). That is what makes rollout parity testable.

* top-k (k > 0): keep the tokens whose scaled logit is >= the k-th largest (ties with the k-th
  are kept, so more than k tokens may survive).
* top-p (0 < p < 1), applied after top-k on the renormalised distribution: sort descending, keep
  the smallest prefix whose probability mass is >= p (the top token is always kept), i.e. token
  i is kept iff the mass strictly before it is < p; tokens tied with the last kept one are kept
  too, so the result does not depend on how a sort orders ties.

The log-prob is always that of the unfiltered `softmax(logits / temperature)`, the distribution
PPO's ratio and KL use (`response_logprobs` with the same temperature gives the same number).
With top-k / top-p the samples come from the filtered distribution instead, so they are slightly
off-policy for PPO; the PPOConfig defaults (top_k=0, top_p=1) keep sampling exactly on-policy.

Noise layout: `gumbel_noise(seed, B, N, V)` -> float32 [B, N, V]; `noise[b, t]` perturbs the
logits that choose response token t of row b (the token at response position t, t = 0 being the
first generated token). It is indexed by the response position only, never by how many rows are
still running, so a row that hits EOS early does not shift the noise of the others. Memory is
B * N * V * 4 bytes (64 x 64 x 50k = 800 MB): external noise is for tests and parity checks;
production sampling draws per step from a `jax.random` key / `torch.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ppo_rlhf.errors import UsageError

SOURCES = ("greedy", "noise", "random")


def gumbel_noise(seed_or_rng: int | np.random.Generator, batch: int, steps: int,
                 vocab: int) -> np.ndarray:
    """Standard Gumbel draws, float32 [batch, steps, vocab], from an int seed or a numpy
    Generator (which advances). Drawn in float64 and rounded, so every value is finite."""
    rng = (seed_or_rng if isinstance(seed_or_rng, np.random.Generator)
           else np.random.default_rng(seed_or_rng))
    for name, v in (("batch", batch), ("steps", steps), ("vocab", vocab)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"gumbel_noise: {name} must be a positive int, got {v!r}")
    return rng.gumbel(size=(int(batch), int(steps), int(vocab))).astype(np.float32)


def check_generate_args(fn: str, query_shape: tuple, mask_shape: tuple, *, max_new_tokens: Any,
                        temperature: Any, top_k: Any, top_p: Any, eos_token_id: Any,
                        pad_token_id: Any, greedy: bool, noise_shape: tuple | None,
                        has_random: bool) -> str:
    """Validate `generate`'s arguments (both backends call this); returns the randomness source:
    "greedy", "noise" (external Gumbel noise) or "random" (a key / generator). ValueError with a
    message naming `fn` and the argument otherwise."""
    if len(query_shape) != 2 or query_shape[0] < 1 or query_shape[1] < 1:
        raise ValueError(f"{fn}: query_ids must be [batch, prompt_len] with both >= 1, got "
                         f"shape {tuple(query_shape)}")
    if tuple(mask_shape) != tuple(query_shape):
        raise ValueError(f"{fn}: query_mask has shape {tuple(mask_shape)}, query_ids "
                         f"{tuple(query_shape)}: they must match")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"{fn}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float, np.floating)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"{fn}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float, np.floating)) or not 0 < top_p <= 1:
        raise ValueError(f"{fn}: top_p must be in (0, 1] (1 = off), got {top_p!r}")
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
            raise ValueError(f"{fn}: {name} must be a token id (int >= 0)"
                             f"{' or None' if name == 'eos_token_id' else ''}, got {v!r}")
    if pad_token_id is None:
        raise ValueError(f"{fn}: pad_token_id must be a token id, got None")
    if greedy:
        return "greedy"
    if noise_shape is not None:
        want = (query_shape[0], int(max_new_tokens))
        if len(noise_shape) != 3 or tuple(noise_shape[:2]) != want:
            raise ValueError(f"{fn}: noise must be float32 [batch, max_new_tokens, vocab] = "
                             f"[{want[0]}, {want[1]}, V], got shape {tuple(noise_shape)}")
        return "noise"
    if not has_random:
        raise ValueError(f"{fn}: sampling needs randomness: pass greedy=True, noise=... or "
                         f"{'key=jax.random.key(seed)' if 'jax' in fn else 'generator=...'}")
    return "random"


# ---- numpy reference of the rule (tests) --------------------------------------------------------
def filter_logits(logits: np.ndarray, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> np.ndarray:
    """logits [..., V] -> float32 logits / temperature with the top-k then top-p filters applied
    (dropped tokens -inf); see the module docstring. A plain numpy reference for the tests."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    if top_k and top_k < x.shape[-1]:
        kth = -np.sort(-x, axis=-1)[..., top_k - 1: top_k]
        x = np.where(x >= kth, x, -np.inf).astype(np.float32)
    if top_p < 1.0:
        srt = -np.sort(-x, axis=-1)
        e = np.exp(srt - srt[..., :1])
        p = e / e.sum(axis=-1, keepdims=True)
        before = np.cumsum(p, axis=-1) - p  # mass strictly before each sorted token
        n_keep = np.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: before[0] = 0
        thresh = np.take_along_axis(srt, n_keep - 1, axis=-1)
        x = np.where(x >= thresh, x, -np.inf).astype(np.float32)
    return x


def sample_reference(logits: np.ndarray, gumbel: np.ndarray | None, *, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, greedy: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(token [...], logprob [...]) for logits [..., V] by the rule above, in numpy."""
    logits = np.asarray(logits, dtype=np.float32)
    if greedy:
        tok = np.argmax(logits, axis=-1)
    else:
        tok = np.argmax(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
                        + np.asarray(gumbel, np.float32), axis=-1)
    scaled = logits.astype(np.float64) / temperature
    m = scaled.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(scaled - m).sum(axis=-1, keepdims=True)))[..., 0]
    lp = np.take_along_axis(scaled, tok[..., None], axis=-1)[..., 0] - lse
    return tok, lp.astype(np.float32)


def apply_eos(response_ids: np.ndarray, logprobs: np.ndarray, eos_token_id: int | None,
              pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The EOS rule in numpy: (ids, mask, logprobs) of responses generated WITHOUT stopping,
    cut after each row's first `eos_token_id` -- mask 1 up to and including it, ids
    `pad_token_id` and log-probs 0 after. Generating with `eos_token_id` must give exactly this
    (a running row sees the same inputs and the same noise either way)."""
    ids = np.asarray(response_ids)
    lp = np.asarray(logprobs, np.float32)
    if eos_token_id is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        is_eos = (ids == eos_token_id).astype(np.int32)
        before = np.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before each position
        mask = (before == 0).astype(np.int32)
    return (np.where(mask == 1, ids, pad_token_id).astype(ids.dtype), mask,
            np.where(mask == 1, lp, 0.0).astype(np.float32))


__all__ = ["gumbel_noise", "check_generate_args", "filter_logits", "sample_reference", "apply_eos",
           "SOURCES"]


# ---- sampling text ---------------------------------------------------------------------------------
def prompt_width(lengths: Sequence[int], max_new_tokens: int, max_positions: int | None) -> int:
    """The prompt length `sample_texts` pads to: the next power of two >= the longest prompt (at
    least 16), so JAX compiles one program per bucket, not per length; clamped so that prompt +
    response fit a model with learned positions (GPT-2). UsageError when a prompt cannot fit."""
    longest = max(lengths)
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise UsageError(f"a prompt has {longest} tokens; with max_new_tokens={max_new_tokens} "
                         f"that passes the model's {max_positions} positions")
    width = max(16, 1 << (int(longest) - 1).bit_length())
    return width if max_positions is None else min(width, max_positions - max_new_tokens)


@dataclass
class TextSamples:
    """One sampled response per prompt: the texts (special tokens skipped) and the token arrays,
    numpy: query_ids / query_mask [N, P] left-padded, response_ids / response_mask [N, R]
    right-padded (EOS included in the mask), contains_eos [N]."""

    prompts: list[str]
    texts: list[str]
    query_ids: np.ndarray
    query_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    contains_eos: np.ndarray

    def chunks(self, size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(number of real rows, arrays of `size` rows) per chunk, the last completed with copies
        of its last row, so every chunk has the same shape (one compilation)."""
        n = len(self.texts)
        for start in range(0, n, size):
            rows = np.arange(start, min(start + size, n))
            real = len(rows)
            rows = np.concatenate([rows, np.full(size - real, rows[-1])])
            yield real, {k: getattr(self, k)[rows] for k in
                         ("query_ids", "query_mask", "response_ids", "response_mask")}
