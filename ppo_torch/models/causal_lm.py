"""`CausalLM`: a thin wrapper of a Hugging Face causal LM. Mirror: `ppo_jax/models/causal_lm.py`.

    logits = model(input_ids, attention_mask=mask)           # [B, T] -> [B, T, V] float32

`mask` [B, T] is 1 on real tokens (default: all ones); positions come from the mask,
cumsum(mask) - 1 clipped at 0, so left-padded prompts start at position 0 (HF's default
positions, 0..T-1, ignore padding); pass `positions` to override. The LM head runs in float32 on
the backbone's hidden states (bfloat16 models: bf16 activations, float32 logits -- the same
arithmetic as the JAX core, where HF would round the logits to bf16).

KV cache (generation) uses HF's own `Cache` (a `DynamicCache` that grows):

    logits, cache = model(prompt_ids, attention_mask=prompt_mask, use_cache=True)
    logits, cache = model(next_ids [B, 1], attention_mask=mask_so_far [B, P + t + 1], cache=cache)

With a cache, `attention_mask` covers the cached tokens AND the new ones, and default positions
are cumsum(attention_mask) - 1 clipped at 0, read at the last S entries. This differs from the
JAX cache (static max_len slots + cache_index), which jit needs; both equal the full forward.

`model.hf_model` is the wrapped `transformers` model (for saving, HF generation, inspection);
`model.config` is its HF config. Dropout is disabled at load (as TRL does for PPO; the JAX
models have none).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

Tensor = torch.Tensor


def default_positions(attention_mask: Tensor, length: int) -> Tensor:
    """cumsum(mask) - 1 clipped at 0, for the last `length` positions of the mask: [B, length]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def project(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden [..., H] @ weight[N, H].T in float32 (bf16 inputs are upcast, which is exact;
    float64 stays float64)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    return F.linear(hidden.to(dtype), weight.to(dtype))


def backbone_hidden(hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    positions: Tensor | None, cache=None, use_cache: bool = False):
    """(final-norm hidden states [B, S, H], cache or None) of an HF model's backbone."""
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        attention_mask = torch.ones((input_ids.shape[0], past + input_ids.shape[1]),
                                    dtype=torch.long, device=input_ids.device)
    if positions is None:
        positions = default_positions(attention_mask, input_ids.shape[1])
    use_cache = use_cache or cache is not None
    out = hf_model.base_model(input_ids=input_ids.long(), attention_mask=attention_mask.long(),
                              position_ids=positions.long(), cache=cache, use_cache=use_cache)
    return out.last_hidden_state, (out.cache if use_cache else None)


class CausalLM(nn.Module):
    """A `transformers` causal LM returning float32 logits, positions from the mask."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    @property
    def config(self):
        return self.hf_model.config

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                      positions: Tensor | None = None, cache=None, use_cache: bool = False):
        """(final-norm hidden states [B, S, H] in the model dtype, cache or None)."""
        return backbone_hidden(self.hf_model, input_ids, attention_mask, positions, cache, use_cache)

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """LM head in float32: [..., H] -> [..., V]."""
        return project(hidden, self.hf_model.get_output_embeddings().weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                positions: Tensor | None = None, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0):
        """Logits [B, S, V] float32 (the last `logits_to_keep` positions if > 0); with
        use_cache=True or a cache, (logits, cache). See the module docstring."""
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                               cache=cache, use_cache=use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits_from_hidden(hidden)
        return (logits, new_cache) if (use_cache or cache is not None) else logits
