"""GPT-2 in Flax NNX (the backbone: embeddings, blocks, final norm; the LM head is in causal_lm.py).

Pre-norm blocks, learned absolute position embeddings, fused q/k/v projection, GELU MLP.
Attribute names follow Hugging Face's `GPT2Model` (wte, wpe, h, ln_1, attn.c_attn, ...) so
that weight names map one to one: the blocks are one stacked module run by a scan
(`stack.ScannedBlocks`), and HF's `h.{i}.ln_1.weight` is slice i of `h.stack.ln_1.scale`. HF
stores GPT-2's projections as `Conv1D` with weight [in, out] -- the same layout as an
nnx.Linear kernel, so they load without a transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import Cache, LayerCache, LayerNorm, activation, attend, attention_inputs, embed, linear
from ppo_jax.models.stack import ScannedBlocks

Array = jax.Array

# HF Conv1D weights are [in, out] like our kernels: no transpose when loading the backbone.
TRANSPOSE_BACKBONE_KERNELS = False


class GPT2Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.c_attn = linear(h, 3 * h, use_bias=True, config=config, rngs=rngs, lora="attn.c_attn")
        self.c_proj = linear(h, h, use_bias=True, config=config, rngs=rngs, lora="attn.c_proj")
        self.scale = config.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        self.scale_by_layer = config.scale_attn_by_inverse_layer_idx

    def __call__(self, x: Array, mask: Array, layer_number: Array, cache: LayerCache | None,
                 cache_index) -> tuple[Array, LayerCache | None]:
        B, S, _ = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (B, S, self.num_heads, self.head_dim)
        q = q.reshape(shape)
        if self.scale_by_layer:  # scale_attn_by_inverse_layer_idx: layer i's scores / (i + 1)
            q = q / layer_number.astype(q.dtype)
        out, cache = attend(q, k.reshape(shape), v.reshape(shape), mask, self.scale, cache,
                            cache_index)
        return self.c_proj(out), cache


class GPT2MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        self.c_fc = linear(h, i, use_bias=True, config=config, rngs=rngs, lora="mlp.c_fc")
        self.c_proj = linear(i, h, use_bias=True, config=config, rngs=rngs, lora="mlp.c_proj")
        activation(config.hidden_act)  # unsupported -> ValueError now, not at the first call
        self.hidden_act = config.hidden_act  # a name (hashable, static), not a function

    def __call__(self, x: Array) -> Array:
        return self.c_proj(activation(self.hidden_act)(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.hidden_size, config.norm_eps, config=config)
        self.attn = GPT2Attention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.hidden_size, config.norm_eps, config=config)
        self.mlp = GPT2MLP(config, rngs=rngs)

    def __call__(self, x, mask, layer_number, cache, cache_index):
        a, cache = self.attn(self.ln_1(x), mask, layer_number, cache, cache_index)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


class GPT2Model(nnx.Module):
    """The GPT-2 backbone: token ids -> final-norm hidden states [B, S, H]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = embed(config.vocab_size, config.hidden_size, config=config, rngs=rngs)
        self.wpe = embed(config.max_position_embeddings, config.hidden_size, config=config, rngs=rngs)
        self.h = ScannedBlocks(lambda rngs: GPT2Block(config, rngs=rngs), config.num_layers, rngs=rngs,
                               options=config.options)
        self.ln_f = LayerNorm(config.hidden_size, config.norm_eps, config=config)

    def token_embedding(self) -> nnx.Embed:
        return self.wte

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: Cache | None = None,
                 cache_index=None) -> tuple[Array, Cache | None]:
        positions, mask = attention_inputs(input_ids, attention_mask, positions, cache, cache_index)
        total = input_ids.shape[1] if cache is None else cache.k.shape[3]
        if total > self.config.max_position_embeddings:
            # An out-of-range position would be silently clamped by the embedding lookup.
            raise ValueError(f"gpt2: sequence / cache length {total} exceeds n_positions="
                             f"{self.config.max_position_embeddings}")
        x = self.wte(input_ids) + self.wpe(positions)
        layer_number = np.arange(1, self.config.num_layers + 1)  # block i gets i + 1 (per layer)
        x, cache = self.h(x, mask, per_layer=(layer_number,), cache=cache, cache_index=cache_index)
        return self.ln_f(x), cache
