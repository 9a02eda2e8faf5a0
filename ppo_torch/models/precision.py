"""Mixed precision: `set_compute_dtype(model, "bfloat16")` -- float32 weights (and so float32
optimiser state and gradients), bfloat16 matmuls. Mirror: `ppo_jax/models/precision.py`.

Each model's backbone runs under `torch.autocast(device, dtype=compute_dtype)`
(`causal_lm.backbone_hidden`): the matmuls (linear / Conv1D, attention) take compute_dtype
inputs, while embeddings, the residual stream and the norms stay in the weights' dtype. The
LM head runs outside autocast on inputs rounded to compute_dtype with float32 accumulation and
float32 logits (`causal_lm.project`); value and score heads read the hidden states in float32.
Log-softmax, entropies, losses and advantages are float32 (`ppo_torch.losses`).
"""

from __future__ import annotations

import torch

from ppo_torch.models.causal_lm import CausalLM
from ppo_torch.models.heads import ScalarHeadModel


def set_compute_dtype(model: torch.nn.Module, compute_dtype: str | None) -> torch.nn.Module:
    """Compute `model` in `compute_dtype` ("float32", "bfloat16", "float16"; None = its weights'
    dtype: no autocast), in place; returns `model`. The weights are not touched."""
    dt = None if compute_dtype is None else getattr(torch, compute_dtype)
    found = False
    for m in model.modules():
        if isinstance(m, (CausalLM, ScalarHeadModel)):
            m.compute_dtype, found = dt, True
    if not found:
        raise TypeError(f"set_compute_dtype: {type(model).__name__} holds no CausalLM or "
                        f"ScalarHeadModel")
    return model


__all__ = ["set_compute_dtype"]
