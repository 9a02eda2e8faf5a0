"""The Llama family in Flax NNX: Llama and Qwen2 (the backbone; the LM head is in causal_lm.py).

Pre-norm blocks with RMSNorm, rotary position embeddings (rope_theta; "linear" and "llama3"
scaling), grouped-query attention (num_key_value_heads <= num_attention_heads), SwiGLU MLP
down(silu(gate(x)) * up(x)). Qwen2 is Llama with biases on q/k/v (not on o); Llama's own
`attention_bias` / `mlp_bias` flags are honoured. Attribute names follow HF's `LlamaModel`
(embed_tokens, layers, self_attn.q_proj, mlp.gate_proj, input_layernorm, norm, ...); the
decoder layers are one stacked module run by a scan (`stack.ScannedBlocks`): HF's
`layers.{i}.self_attn.q_proj.weight` is slice i of `layers.stack.self_attn.q_proj.kernel`.
"""

from __future__ import annotations

import jax
from flax import nnx

from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import (
    Cache,
    LayerCache,
    RMSNorm,
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


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, nh, nkv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        self.q_proj = linear(h, nh * d, use_bias=config.qkv_bias, config=config, rngs=rngs,
                             lora="self_attn.q_proj")
        self.k_proj = linear(h, nkv * d, use_bias=config.qkv_bias, config=config, rngs=rngs,
                             lora="self_attn.k_proj")
        self.v_proj = linear(h, nkv * d, use_bias=config.qkv_bias, config=config, rngs=rngs,
                             lora="self_attn.v_proj")
        self.o_proj = linear(nh * d, h, use_bias=config.o_bias, config=config, rngs=rngs,
                             lora="self_attn.o_proj")

    def __call__(self, x: Array, rope: tuple[Array, Array], mask: Array, cache: LayerCache | None,
                 cache_index) -> tuple[Array, LayerCache | None]:
        B, S, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(B, S, self.num_heads, self.head_dim), rope)
        k = apply_rope(self.k_proj(x).reshape(B, S, self.num_kv_heads, self.head_dim), rope)
        v = self.v_proj(x).reshape(B, S, self.num_kv_heads, self.head_dim)
        out, cache = attend(q, k, v, mask, self.head_dim ** -0.5, cache, cache_index)
        return self.o_proj(out), cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(h, i, use_bias=config.mlp_bias, config=config, rngs=rngs,
                                lora="mlp.gate_proj")
        self.up_proj = linear(h, i, use_bias=config.mlp_bias, config=config, rngs=rngs,
                              lora="mlp.up_proj")
        self.down_proj = linear(i, h, use_bias=config.mlp_bias, config=config, rngs=rngs,
                                lora="mlp.down_proj")
        activation(config.hidden_act)  # unsupported -> ValueError now, not at the first call
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.down_proj(activation(self.hidden_act)(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config=config)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, config=config)
        self.mlp = LlamaMLP(config, rngs=rngs)

    def __call__(self, x, rope, mask, cache, cache_index):
        a, cache = self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    """The Llama / Qwen2 backbone: token ids -> final-norm hidden states [B, S, H]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = embed(config.vocab_size, config.hidden_size, config=config, rngs=rngs)
        self.layers = ScannedBlocks(lambda rngs: LlamaDecoderLayer(config, rngs=rngs), config.num_layers,
                                    rngs=rngs, options=config.options)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config=config)

    def token_embedding(self) -> nnx.Embed:
        return self.embed_tokens

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: Cache | None = None,
                 cache_index=None) -> tuple[Array, Cache | None]:
        positions, mask = attention_inputs(input_ids, attention_mask, positions, cache, cache_index)
        x = self.embed_tokens(input_ids)
        rope = rope_cos_sin(positions, rope_inv_freq(self.config))  # once, for every layer
        x, cache = self.layers(x, rope, mask, cache=cache, cache_index=cache_index)
        return self.norm(x), cache
