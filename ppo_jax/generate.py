"""Sampling responses with a KV cache, jit-compiled. Mirror: `ppo_torch/generate.py`.

    out = generate(policy, query_ids, query_mask, max_new_tokens=64, temperature=0.7,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   key=jax.random.key(0))
    out.response_ids   # [B, N] int32: sampled tokens, pad_token_id after the first EOS
    out.response_mask  # [B, N] int32: 1 up to AND including the first EOS, 0 after
    out.logprobs       # [B, N] float32: log softmax(logits / temperature)[token], 0 at padding

`model`: a `CausalLM` or `PolicyWithValueHead` (anything with `init_cache` and the KV-cache call
convention of `ppo_jax.models.causal_lm`). Prompts are LEFT-padded [B, P] (`RolloutBatch`
layout): pads first, then the prompt; every row needs at least one real token. Exactly
`max_new_tokens` = N positions are returned; `eos_token_id=None` never stops (fixed-length
responses, as the benchmarks use).

Sampling rule (identical in both backends; see `ppo_rlhf.sampling`): scaled = logits / temperature,
top-k then top-p (nucleus) set dropped tokens to -inf, token = argmax(filtered + Gumbel noise);
greedy=True takes argmax(logits). Randomness, exactly one of:
  * greedy=True;
  * noise: float32 [B, N, V] standard Gumbel draws (`ppo_rlhf.sampling.gumbel_noise`), noise[:, t]
    for response position t -- fed to both backends, it makes them pick the same tokens;
  * key: a `jax.random` key; step t uses gumbel(fold_in(key, t)). Split it between calls
    (`key, sub = jax.random.split(key)`): the same key gives the same samples.
`logprobs` are always of the UNFILTERED temperature distribution -- what PPO's ratio and the KL
use and what `response_logprobs(..., temperature)` recomputes. With top_k > 0 or top_p < 1 the
samples come from the filtered distribution, so PPO treats slightly off-policy samples as
on-policy; `PPOConfig` defaults (top_k=0, top_p=1) sample exactly from pi.
Logits and all sampling math are float32 (bfloat16 models: bf16 weights, activations and KV
cache; float32 logits).

Compilation: `generate` splits the model (`nnx.split`: graphdef + state, no copy of the weights)
and calls `make_generate_fn(graphdef, options)`, a cached `jax.jit` of one XLA program per
(graphdef, SamplingOptions), specialised by jit on the shapes (B, P) and the state's dtypes: prefill
of the prompt, then the decode loop in `lax.while_loop` (one token per iteration, leaving early once
every row has emitted EOS -- outputs keep their static [B, N] shape). The KV cache is created inside
that program (`init_cache(B, P + N - 1)`: k and v stacked over the layers, [layers, B, kv_heads,
slots, head_dim]), so it never crosses the host boundary and XLA updates it in place in the loop
carry -- and, within a step, in the carry of the model's scan over layers, each layer writing its
one new slot; nothing syncs with the host per token. New weights with the same structure (after a
PPO update, or `nnx.update`) reuse the compiled program: the state is an argument, not a constant.
Bucket prompt lengths (pad P to a few fixed sizes) to bound the number of compilations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.losses import logprobs_from_logits
from ppo_rlhf.rollout import check_mask
from ppo_rlhf.sampling import SOURCES, check_generate_args

Array = jax.Array


class GenerationOutput(NamedTuple):
    """Sampled responses, RIGHT-padded (a pytree: it can leave a jitted function)."""

    response_ids: Array
    """[B, N] int32: the sampled tokens; pad_token_id after the first EOS."""
    response_mask: Array
    """[B, N] int32: 1 up to and including the first EOS, 0 after."""
    logprobs: Array
    """[B, N] float32: log softmax(logits / temperature) of each token (unfiltered); 0 at padding."""


@dataclass(frozen=True)
class SamplingOptions:
    """The static options of a compiled generation function (hashable: part of the cache key)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    source: str = "random"
    """Randomness: "greedy", "noise" (external Gumbel noise) or "random" (a jax.random key)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"SamplingOptions.source={self.source!r}: allowed {', '.join(SOURCES)}")

    def rule(self) -> dict[str, Any]:
        """The keyword arguments of `sample_token`."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    greedy=self.source == "greedy")


# ---- the sampling rule ----------------------------------------------------------------------------
def filter_logits(scaled: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Top-k then top-p (nucleus) on temperature-scaled float32 logits [..., V]: dropped tokens
    become -inf. top-k keeps logits >= the k-th largest; top-p keeps the smallest sorted prefix
    whose mass is >= top_p (the top token always) plus anything tied with its last token.
    `top_k`, `top_p` are static Python numbers (0 and 1 switch a filter off)."""
    V = scaled.shape[-1]
    if top_k and top_k < V:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    if top_p < 1.0:
        srt = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)  # descending; -inf last
        p = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p  # mass strictly before each sorted token
        n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1 (before[0] == 0)
        thresh = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        scaled = jnp.where(scaled >= thresh, scaled, -jnp.inf)
    return scaled


def sample_token(logits: Array, gumbel: Array | None, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False
                 ) -> tuple[Array, Array]:
    """(token [B] int32, logprob [B] float32) from logits [B, V] by the rule of the module
    docstring; `gumbel` [B, V] float32 (ignored when greedy). The options are static Python
    numbers (`SamplingOptions.rule()` gives them)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        token = jnp.argmax(filter_logits(logits / temperature, top_k, top_p) + gumbel, axis=-1)
    return token.astype(jnp.int32), logprobs_from_logits(logits, token, temperature)


def _step_noise(options: SamplingOptions, rand: Any, t: Array, shape: tuple[int, int]) -> Array | None:
    """The Gumbel draws [B, V] for response position t."""
    if options.source == "noise":
        return jax.lax.dynamic_index_in_dim(rand, t, axis=1, keepdims=False)
    if options.source == "random":
        return jax.random.gumbel(jax.random.fold_in(rand, t), shape, jnp.float32)
    return None


# ---- the compiled program ---------------------------------------------------------------------
def _generate_impl(graphdef: Any, options: SamplingOptions, cache_sharding: Any, state: Any,
                   query_ids: Array, query_mask: Array, rand: Any) -> GenerationOutput:
    model = nnx.merge(graphdef, state)
    B, P = query_ids.shape
    N = options.max_new_tokens
    pad, eos = options.pad_token_id, options.eos_token_id
    # Slots: P prompt slots, then the first N - 1 response tokens (the last one is sampled but
    # never fed back, so it needs no slot).
    slots = P + N - 1
    cache = _constrain(model.init_cache(B, slots), cache_sharding)
    kv_mask = jnp.zeros((B, slots), jnp.int32).at[:, :P].set(query_mask.astype(jnp.int32))
    logits, cache = model(query_ids, attention_mask=kv_mask, cache=cache, cache_index=0,
                          logits_to_keep=1)
    V = logits.shape[-1]
    if options.source == "noise" and rand.shape[-1] != V:
        raise ValueError(f"generate: noise has vocab dimension {rand.shape[-1]}, the model's "
                         f"logits {V}")
    t0 = jnp.zeros((), jnp.int32)
    token, lp = sample_token(logits[:, -1], _step_noise(options, rand, t0, (B, V)), **options.rule())
    ids = jnp.full((B, N), pad, jnp.int32).at[:, 0].set(token)
    mask = jnp.zeros((B, N), jnp.int32).at[:, 0].set(1)
    lps = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp)
    done = (token == eos) if eos is not None else jnp.zeros((B,), bool)

    def cond(carry):
        t, _, _, _, done, _, _, _ = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, cache, kv_mask, prev, done, ids, mask, lps = carry
        slot = P + t - 1  # where token t - 1 goes
        kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, jnp.ones((B, 1), jnp.int32), slot, axis=1)
        logits, cache = model(prev[:, None], attention_mask=kv_mask, cache=cache, cache_index=slot)
        cache = _constrain(cache, cache_sharding)
        token, lp = sample_token(logits[:, 0], _step_noise(options, rand, t, (B, V)), **options.rule())
        alive = ~done
        token = jnp.where(alive, token, pad)  # a finished row is fed pads (its outputs unused)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None], t, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, alive.astype(jnp.int32)[:, None], t, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, jnp.where(alive, lp, 0.0)[:, None], t, axis=1)
        if eos is not None:
            done = done | (token == eos)
        return t + 1, cache, kv_mask, token, done, ids, mask, lps

    carry = (jnp.ones((), jnp.int32), cache, kv_mask, token, done, ids, mask, lps)
    _, _, _, _, _, ids, mask, lps = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(ids, mask, lps)


def _constrain(cache: Any, sharding: Any) -> Any:
    return cache if sharding is None else jax.lax.with_sharding_constraint(cache, sharding)


def make_generate_fn(graphdef: Any, options: SamplingOptions,
                     cache_sharding: Any = None) -> Callable[..., GenerationOutput]:
    """The compiled generation function for a model structure and sampling options:

        fn = make_generate_fn(graphdef, SamplingOptions(max_new_tokens=64, eos_token_id=2))
        out = fn(state, query_ids, query_mask, rand)   # -> GenerationOutput

    with `graphdef, state = nnx.split(model)`; `rand` is a jax.random key (source "random"),
    float32 Gumbel noise [B, N, V] ("noise") or None ("greedy"). Cached per (graphdef, options)
    (the same call returns the same jitted function); jit adds one compilation per input shape
    / dtype. `cache_sharding`: a `jax.sharding.Sharding` for the KV cache's k and v arrays,
    [layers, B, kv_heads, slots, head_dim] (a mesh: `ppo_jax.parallel.Placement.kv_cache`, rows
    split like the batch); None lets XLA choose.
    No argument checks: `generate` does those."""
    return _make_generate_fn(graphdef, options, cache_sharding)


@functools.lru_cache(maxsize=64)
def _make_generate_fn(graphdef: Any, options: SamplingOptions, cache_sharding: Any) -> Callable:
    return jax.jit(functools.partial(_generate_impl, graphdef, options, cache_sharding))


def _is_concrete(x: Any) -> bool:
    """A value this host can read (not a tracer, not an array sharded across hosts)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def generate(model: nnx.Module, query_ids: Any, query_mask: Any, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0, greedy: bool = False,
             noise: Any = None, key: Any = None, cache_sharding: Any = None) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each LEFT-padded prompt; see the module
    docstring. `key` (a jax.random key) is required unless greedy=True or `noise` (float32
    [B, max_new_tokens, V] Gumbel draws) is given; `cache_sharding`: see `make_generate_fn`.
    ValueError on bad arguments (a query_mask that is not left-padded or has an empty row
    included, when it is concrete)."""
    q_shape, m_shape = np.shape(query_ids), np.shape(query_mask)
    source = check_generate_args(
        "ppo_jax.generate", q_shape, m_shape, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, greedy=greedy,
        noise_shape=None if noise is None else np.shape(noise), has_random=key is not None)
    if _is_concrete(query_mask):
        check_mask("generate: query_mask", np.asarray(query_mask), layout="left")
    options = SamplingOptions(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                              top_k=int(top_k), top_p=float(top_p),
                              eos_token_id=None if eos_token_id is None else int(eos_token_id),
                              pad_token_id=int(pad_token_id), source=source)
    rand = {"greedy": None, "random": key,
            "noise": None if noise is None else jnp.asarray(noise, jnp.float32)}[source]
    graphdef, state = nnx.split(model)
    fn = make_generate_fn(graphdef, options, cache_sharding)
    return fn(state, jnp.asarray(query_ids, jnp.int32), jnp.asarray(query_mask, jnp.int32), rand)


__all__ = ["generate", "GenerationOutput", "SamplingOptions", "make_generate_fn", "filter_logits",
           "sample_token"]
