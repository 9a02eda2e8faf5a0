"""Layers shared by the architectures: norms, rotary embeddings, masks, attention, the KV cache.

Conventions (every architecture file follows them):
  * activations are [B, S, H] in the model dtype (float32 or bfloat16; float64 for checks);
    with a compute dtype (mixed precision, `ModelConfig.compute_dtype`, `precision.py`) the
    projections (`linear`) compute and return it, the residual stream stays in the model dtype;
  * norms reduce in float32, attention scores and softmax are float32, logits are float32 --
    "float32" meaning float32 or wider (`upcast`: a float64 model computes all in float64);
  * q / k / v are [B, S, n_heads, head_dim]; grouped-query attention groups the query heads
    of each KV head (head h uses KV head h // (n_heads // n_kv_heads), as HF's repeat_kv);
  * masks are boolean [B, S, T]: query s may attend key t. Masked scores are set to a large
    negative FINITE number (not -inf), so a row with no key at all (a left-padding query) gives
    a uniform softmax instead of NaN -- such rows are padding and never read, but a NaN there
    would reach real rows through 0 * NaN in the next layer's attention;
  * a model's blocks are ONE stacked module run by a scan (`ppo_jax.models.stack`): a block
    sees one layer's parameters, and the KV cache through a `LayerCache` view.

Attention: `jax.nn.dot_product_attention` (`dot_product_attention` below), JAX's entry point to
the platform's fused kernels; see there for dtypes. KV cache: see `Cache`, `LayerCache` and
`attention_inputs`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.lora import lora_linear_or_none

Array = jax.Array
NEG_INF = float(np.finfo(np.float32).min)


def jnp_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def wide(dtype) -> jnp.dtype:
    """The dtype norms, softmaxes and logits are computed in: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(x: Array) -> Array:
    """x in `wide(x.dtype)` (bfloat16 -> float32; float32 and float64 unchanged)."""
    return x.astype(wide(x.dtype))


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    """The dtype of the matmuls: config.compute_dtype (mixed precision), else the model dtype."""
    return jnp_dtype(config.compute_dtype or config.dtype)


def linear(in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig,
           rngs: nnx.Rngs, lora: str | None = None) -> nnx.Linear:
    """nnx.Linear (kernel [in, out]) with parameters in the model dtype, computing in
    `compute_dtype(config)` (input, kernel and bias cast to it; output in it). `lora`: the
    projection's module path in a decoder layer (`ppo_rlhf.lora.LORA_MODULES`); when the model's
    options put an adapter on it, a `ppo_jax.models.lora.LoRALinear` (the same nnx.Linear plus
    the adapter pair)."""
    kw = dict(use_bias=use_bias, dtype=compute_dtype(config), param_dtype=jnp_dtype(config.dtype),
              rngs=rngs)
    adapted = lora_linear_or_none(in_features, out_features, module=lora, config=config, **kw)
    return adapted if adapted is not None else nnx.Linear(in_features, out_features, **kw)


def embed(num: int, features: int, *, config: ModelConfig, rngs: nnx.Rngs) -> nnx.Embed:
    dt = jnp_dtype(config.dtype)
    return nnx.Embed(num, features, dtype=dt, param_dtype=dt, rngs=rngs)


def activation(name: str):
    """HF `hidden_act` / `activation_function` -> a JAX function."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}; supported: gelu, gelu_new, "
                     f"gelu_pytorch_tanh, gelu_fast, silu, swish, relu")


# ---- norms -------------------------------------------------------------------------------------
class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias; statistics in float32 (`upcast`), output in the model dtype."""

    def __init__(self, dim: int, eps: float, *, config: ModelConfig):
        dt = jnp_dtype(config.dtype)
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dt))
        self.bias = nnx.Param(jnp.zeros((dim,), dt))

    def __call__(self, x: Array) -> Array:
        x32 = upcast(x)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(x32.dtype) + self.bias[...].astype(x32.dtype)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in HF Llama/Qwen2: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, config: ModelConfig):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp_dtype(config.dtype)))

    def __call__(self, x: Array) -> Array:
        x32 = upcast(x)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


# ---- rotary position embeddings ---------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2], float32, as HF computes them for rope_type
    "default", "linear" (positions divided by `factor`) and "llama3" (Llama 3.1's smooth
    frequency-dependent scaling). A numpy constant: it is folded into the compiled program."""
    dim = config.rotary_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    extra = dict(config.rope_scaling)
    if config.rope_type == "linear":
        inv = inv / np.float32(extra["factor"])
    elif config.rope_type == "llama3":
        factor, lo, hi = extra["factor"], extra["low_freq_factor"], extra["high_freq_factor"]
        old_len = extra["original_max_position_embeddings"]
        low_wl, high_wl = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """(cos, sin) [B, S, 1, 2 * len(inv_freq)] float32 of the angles positions [B, S] * inv_freq,
    computed once per forward pass and shared by every layer (as HF's rotary_emb). float32 even
    for a float64 model, as transformers computes them (its rotary embedding calls .float())."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, S, 1, rd]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos_sin: tuple[Array, Array]) -> Array:
    """Rotate the first rotary_dim = cos.shape[-1] dims of each head of x [B, S, n, D] by the
    angles of `rope_cos_sin` (HF's rotate_half convention: pairs (i, i + rotary_dim / 2)); the
    remaining dims (partial rotary, GPT-NeoX) pass through."""
    cos, sin = (c.astype(x.dtype) for c in cos_sin)
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated, x_pass], axis=-1) if rd < x.shape[-1] else rotated


# ---- KV cache ----------------------------------------------------------------------------------
class Cache(NamedTuple):
    """A model's KV cache: keys and values of every layer for every slot,
    k, v [num_layers, B, n_kv_heads, max_len, head_dim] (a pytree: donate it, carry it in lax.scan).

    Stacked like the blocks' parameters and carried through the scan over layers: block i
    writes its new keys/values into k[i], v[i] in place (`LayerCache`). Head-major, so that
    the attention dots of a decode step read a layer's cache as it lies: with
    [B, max_len, n_kv, D], XLA transposed (copied) the whole cache of every layer at every
    step, which halved decode speed on CPU."""

    k: Array
    v: Array


class LayerCache(NamedTuple):
    """What one block sees of the model's `Cache` inside the scan over layers: the whole cache
    and its own layer index (a traced int32). `attend` writes the block's new keys/values at
    [layer, :, :, cache_index : cache_index + S] of the whole cache (in place: the cache is
    the scan's carry, not sliced out and written back) and returns the updated view."""

    cache: Cache
    layer: Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
    """Zeros for every layer; dtype defaults to the compute dtype (`compute_dtype`: the dtype
    of the keys and values the projections produce)."""
    dt = jnp.dtype(dtype or compute_dtype(config))
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    return Cache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def attention_inputs(input_ids: Array, attention_mask: Array | None, positions: Array | None,
                     cache: Cache | None, cache_index) -> tuple[Array, Array]:
    """(positions [B, S] int32, mask [B, S, T] bool) for a forward pass.

    Without a cache: T = S, attention_mask [B, S] (default all ones) marks real tokens, query s
    attends key t iff t <= s and attention_mask[t]; positions default to cumsum(mask) - 1
    clipped at 0 (left padding: the first real token is position 0).

    With a cache of max_len slots: attention_mask [B, max_len] marks the cache slots holding
    real tokens (required), the S inputs occupy slots [cache_index, cache_index + S), query s
    attends slot t iff t <= cache_index + s and attention_mask[t]; default positions are
    cumsum(attention_mask) - 1 clipped at 0, read at those S slots."""
    B, S = input_ids.shape
    if cache is None:
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                             f"{input_ids.shape}: they must match (without a cache)")
        q_slots = jnp.arange(S)
        k_slots = jnp.arange(S)
        start = 0
    else:
        max_len = cache.k.shape[3]
        if attention_mask is None or attention_mask.shape != (B, max_len):
            raise ValueError(f"with a cache, attention_mask must be the [B, max_len] = {(B, max_len)} "
                             f"mask of real cache slots; got "
                             f"{None if attention_mask is None else attention_mask.shape}")
        if cache_index is None:
            raise ValueError("with a cache, cache_index (the first slot to write) is required")
        if isinstance(cache_index, int) and not 0 <= cache_index <= max_len - S:
            raise ValueError(f"cache_index={cache_index} + {S} new tokens does not fit a cache of "
                             f"{max_len} slots")
        start = cache_index
        q_slots = cache_index + jnp.arange(S)
        k_slots = jnp.arange(max_len)
    real = attention_mask != 0
    if positions is None:
        all_pos = jnp.maximum(jnp.cumsum(real.astype(jnp.int32), axis=-1) - 1, 0)
        positions = jax.lax.dynamic_slice_in_dim(all_pos, start, S, axis=1)
    causal = k_slots[None, :] <= q_slots[:, None]  # [S, T]
    mask = causal[None, :, :] & real[:, None, :]
    return positions.astype(jnp.int32), mask


# ---- attention ---------------------------------------------------------------------------------
def attend(q: Array, k: Array, v: Array, mask: Array, scale: float, cache: LayerCache | None,
           cache_index) -> tuple[Array, LayerCache | None]:
    """Scaled dot-product attention with grouped-query heads and an optional KV cache.

    q [B, S, n_heads, D]; k, v [B, S, n_kv_heads, D] (this step's keys/values); mask [B, S, T].
    With a cache, k and v are first written at slots [cache_index, cache_index + S) of the
    block's layer, and the queries attend that layer's whole cache (T = max_len). Returns
    ([B, S, n_heads * D] in q's dtype, updated cache view or None)."""
    B, S, nh, D = q.shape
    if cache is not None:
        whole, layer = cache
        zero = jnp.zeros((), jnp.int32)
        at = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)

        def write(buf: Array, new: Array) -> Array:  # new [B, S, n_kv, D] -> the head-major slots
            new = jnp.swapaxes(new, 1, 2)[None].astype(buf.dtype)  # [1, B, n_kv, S, D]
            return jax.lax.dynamic_update_slice(buf, new, at)

        whole = Cache(write(whole.k, k), write(whole.v, v))
        cache = LayerCache(whole, layer)
        # this layer's keys and values as jax.nn's [B, max_len, n_kv, D]: XLA folds the swap
        # into the attention dots (no transposed copy of the cache is made), but XLA:CPU does
        # copy the layer's slice out of the stacked cache first (benchmarks/README.md, "Where
        # the time goes", also what reading it in place through multiply-reduce fusions cost)
        k, v = (jnp.swapaxes(jax.lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False), 1, 2)
                .astype(q.dtype) for buf in whole)
    out = dot_product_attention(q, k, v, mask, scale)
    return out.reshape(B, S, nh * D), cache


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """softmax(q k^T * scale where mask, else a large negative number) v, per query head:
    q [B, S, n_heads, D], k, v [B, T, n_kv_heads, D], mask [B, S, T] bool -> [B, S, n_heads, D].

    `jax.nn.dot_product_attention` with implementation=None: JAX picks the implementation for
    the platform (today XLA's fused einsums everywhere; cuDNN flash attention is its GPU
    candidate), exact on CPU. It computes scores in float32 (bfloat16 inputs: float32
    accumulation), its softmax in float32, masks with -0.7 * float32 max (finite: an empty row
    gives a uniform softmax, not NaN) and returns q's dtype. Its softmax is float32 whatever the
    input, so a float64 model (numerics checks) takes the same math written out in float64."""
    if q.dtype == jnp.float64 or (q.dtype == jnp.float16 and jax.default_backend() == "cpu"):
        # float16 (mixed precision): XLA:CPU has no float16 dot accumulating in float32, which
        # jax.nn asks for; the written-out math does the same (scores and softmax in float32)
        return _attention_wide(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                        implementation=None)


def _attention_wide(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
    """`dot_product_attention` with scores and softmax in `wide(q.dtype)` (float64, or float32
    for float16 inputs)."""
    B, S, nh, D = q.shape
    nkv = k.shape[2]
    qg = q.reshape(B, S, nkv, nh // nkv, D)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=wide(q.dtype)) * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(B, S, nh, D)
