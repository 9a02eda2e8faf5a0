"""GPT-NeoX (Pythia) in Flax NNX (the backbone; the LM head, `embed_out`, is in causal_lm.py).

LayerNorm blocks with a parallel residual (x + attn(ln1(x)) + mlp(ln2(x)), the Pythia default;
`use_parallel_residual=false` gives the sequential form), partial rotary embeddings (only the
first rotary_pct of each head is rotated), GELU MLP. The fused `query_key_value` projection is
laid out per head, [n_heads, 3, head_dim] along its output (HF views it as [..., n_heads,
3 * head_dim] and chunks q, k, v from each head's slice). Attribute names follow HF's
`GPTNeoXModel` (embed_in, layers, attention.query_key_value, final_layer_norm, ...); the layers
are one stacked module run by a scan (`stack.ScannedBlocks`): HF's
`layers.{i}.attention.dense.weight` is slice i of `layers.stack.attention.dense.kernel`.
"""

from __future__ import annotations

import jax
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import (
    Cache,
    LayerCache,
    LayerNorm,
    activation,
    apply_rope,
    attend,
    attention_inputs,
    embed,
    linear,
    rope_cos_sin,
    rope_inv_freq,
)
from ppo_jax.models.stack import ScannedBlocks

Array = jax.Array

# HF nn.Linear weights are [out, in]; our kernels are [in, out].
TRANSPOSE_BACKBONE_KERNELS = True


class GPTNeoXAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = linear(h, 3 * h, use_bias=config.qkv_bias, config=config, rngs=rngs,
                                      lora="attention.query_key_value")
        self.dense = linear(h, h, use_bias=config.o_bias, config=config, rngs=rngs,
                            lora="attention.dense")

    def __call__(self, x: Array, rope: tuple[Array, Array], mask: Array, cache: LayerCache | None,
                 cache_index) -> tuple[Array, LayerCache | None]:
        B, S, _ = x.shape
        qkv = self.query_key_value(x).reshape(B, S, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out, cache = attend(q, k, v, mask, self.head_dim ** -0.5, cache, cache_index)
        return self.dense(out), cache


class GPTNeoXMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        self.dense_h_to_4h = linear(h, i, use_bias=True, config=config, rngs=rngs, lora="mlp.dense_h_to_4h")
        self.dense_4h_to_h = linear(i, h, use_bias=True, config=config, rngs=rngs, lora="mlp.dense_4h_to_h")
        activation(config.hidden_act)  # unsupported -> ValueError now, not at the first call
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.dense_4h_to_h(activation(self.hidden_act)(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_eps, config=config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.norm_eps, config=config)
        self.attention = GPTNeoXAttention(config, rngs=rngs)
        self.mlp = GPTNeoXMLP(config, rngs=rngs)

    def __call__(self, x, rope, mask, cache, cache_index):
        a, cache = self.attention(self.input_layernorm(x), rope, mask, cache, cache_index)
        if self.use_parallel_residual:
            return x + a + self.mlp(self.post_attention_layernorm(x)), cache
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class GPTNeoXModel(nnx.Module):
    """The GPT-NeoX backbone: token ids -> final-norm hidden states [B, S, H]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_in = embed(config.vocab_size, config.hidden_size, config=config, rngs=rngs)
        self.layers = ScannedBlocks(lambda rngs: GPTNeoXLayer(config, rngs=rngs), config.num_layers,
                                    rngs=rngs, options=config.options)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.norm_eps, config=config)

    def token_embedding(self) -> nnx.Embed:
        return self.embed_in

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: Cache | None = None,
                 cache_index=None) -> tuple[Array, Cache | None]:
        positions, mask = attention_inputs(input_ids, attention_mask, positions, cache, cache_index)
        x = self.embed_in(input_ids)
        rope = rope_cos_sin(positions, rope_inv_freq(self.config))  # once, for every layer
        x, cache = self.layers(x, rope, mask, cache=cache, cache_index=cache_index)
        return self.final_layer_norm(x), cache
