"""`CausalLM`: a backbone (gpt2.py, llama.py, gpt_neox.py) + the LM head, with a KV cache.

Calling conventions
-------------------
Full forward (training, log-probs, scoring):

    logits = model(input_ids, attention_mask=mask)          # [B, T] -> [B, T, V] float32

`mask` [B, T] is 1 on real tokens (default: all ones); padding may be anywhere (prompts are
LEFT-padded, responses RIGHT-padded). Positions come from the mask, cumsum(mask) - 1 clipped at
0, so a left-padded prompt starts at position 0 exactly as it would unpadded; pass `positions`
[B, T] to override. Logits at padded positions are finite but meaningless.

KV cache (generation): the cache has a static number of slots, max_len, fixed at creation:

    cache = model.init_cache(batch_size, max_len, dtype=None)   # Cache(k, v), each
                                                                 # [L, B, n_kv, max_len, head_dim]
    logits, cache = model(input_ids, attention_mask=kv_mask, positions=None,
                          cache=cache, cache_index=idx)

* `input_ids` [B, S]: S = P for the prefill of a left-padded prompt, S = 1 per decode step.
* The new keys/values are written at slots [idx, idx + S) with `lax.dynamic_update_slice`;
  `idx` is a Python int or a traced int32 scalar (inside `lax.scan`). idx + S <= max_len is
  checked when idx is a Python int; a traced idx past the end would be clamped by XLA -- don't.
* `kv_mask` [B, max_len] (int or bool) marks the slots holding REAL tokens, including the S
  being written now: prompt padding is 0, not-yet-written slots are 0 (so whatever they hold
  is never attended).
* Query s (at slot idx + s) attends slot t iff t <= idx + s and kv_mask[:, t] == 1: causal
  within the block being written, and over everything real before it.
* `positions` default to cumsum(kv_mask) - 1 clipped at 0, read at slots [idx, idx + S): the
  right positions for left-padded prompts as long as kv_mask is kept as described.
* Returns logits [B, S, V] (float32) and the updated cache (donate the old one under jit).

Typical generation with prompt length P and N new tokens: cache = init_cache(B, P + N);
kv_mask = concat(prompt_mask, zeros(B, N)); prefill with (prompt_ids, idx=0) and take
logits[:, -1]; then for t in 0..N-1: kv_mask[:, P + t] = 1, call with (token[:, None],
idx=P + t). This equals the full forward over the concatenated sequence (tested).

`logits_to_keep=n > 0` computes logits for the last n positions only (as HF): e.g. 1 at prefill,
so a [B, P, V] float32 tensor is never materialised.

jit: every method is traceable; for hot loops use `graphdef, state = nnx.split(model)` and a pure
`jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models import gpt2, gpt_neox, llama
from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import Cache, init_cache, linear, wide

Array = jax.Array

BACKBONES = {"gpt2": gpt2.GPT2Model, "llama": llama.LlamaModel, "qwen2": llama.LlamaModel,
             "gpt_neox": gpt_neox.GPTNeoXModel}
TRANSPOSE_BACKBONE_KERNELS = {"gpt2": gpt2.TRANSPOSE_BACKBONE_KERNELS,
                              "llama": llama.TRANSPOSE_BACKBONE_KERNELS,
                              "qwen2": llama.TRANSPOSE_BACKBONE_KERNELS,
                              "gpt_neox": gpt_neox.TRANSPOSE_BACKBONE_KERNELS}


def make_backbone(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return BACKBONES[config.model_type](config, rngs=rngs)


def project(hidden: Array, kernel: Array) -> Array:
    """hidden [..., H] @ kernel [H, N] accumulated and returned in float32 (`layers.wide`)."""
    return jnp.einsum("...h,hn->...n", hidden, kernel.astype(hidden.dtype),
                      preferred_element_type=wide(hidden.dtype))


class CausalLM(nnx.Module):
    """Backbone + LM head (tied to the token embedding when config.tie_word_embeddings)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = make_backbone(config, rngs)
        self.lm_head = None if config.tie_word_embeddings else linear(
            config.hidden_size, config.vocab_size, use_bias=False, config=config, rngs=rngs)

    def hidden_states(self, input_ids: Array, attention_mask: Array | None = None, *,
                      positions: Array | None = None, cache: Cache | None = None,
                      cache_index=None) -> tuple[Array, Cache | None]:
        """(final-norm hidden states [B, S, H] in the model dtype, updated cache or None)."""
        return self.backbone(input_ids, attention_mask, positions=positions, cache=cache,
                             cache_index=cache_index)

    def head_kernel(self) -> Array:
        """The LM head's [H, V] kernel (the token embedding transposed when tied)."""
        if self.lm_head is None:
            return self.backbone.token_embedding().embedding[...].T
        return self.lm_head.kernel[...]

    def project_head(self, hidden: Array, kernel: Array) -> Array:
        """hidden [..., H] @ kernel [H, V] -> float32 logits (`project`); with a compute dtype
        (mixed precision), both inputs rounded to it first, accumulation still float32."""
        if self.config.compute_dtype is not None:
            hidden = hidden.astype(self.config.compute_dtype)
        return project(hidden, kernel)

    def logits_from_hidden(self, hidden: Array) -> Array:
        """LM head in float32: [..., H] -> [..., V]."""
        return self.project_head(hidden, self.head_kernel())

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 positions: Array | None = None, cache: Cache | None = None, cache_index=None,
                 logits_to_keep: int = 0) -> Array | tuple[Array, Cache]:
        """Logits [B, S, V] float32 (the last `logits_to_keep` positions if > 0); with a cache,
        (logits, updated cache). See the module docstring."""
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                               cache=cache, cache_index=cache_index)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
        """An empty (zero) KV cache of `max_len` slots; dtype defaults to the compute dtype."""
        return init_cache(self.config, batch_size, max_len, dtype)
