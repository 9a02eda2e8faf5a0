"""Activation checkpointing (`remat`) of the Hugging Face models' decoder layers. Mirror:
`ppo_jax.models.stack` (the same three policy names: `ppo_rlhf.config.ModelOptions.remat`, the
config field `PPOConfig.remat` / `RMConfig.remat` / `SFTConfig.remat`).

    lm = load_pretrained("ckpt/", options=ModelOptions(remat="dots"))   # fixed at construction

`CausalLM` / `ScalarHeadModel` call `checkpoint_layers(hf_model, remat)` when they are built.

  * "none": autograd keeps every intermediate of every layer for the backward;
  * "full": each decoder layer keeps only its inputs; the backward recomputes the layer's forward
    (`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`);
  * "dots": the same, with selective activation checkpointing
    (`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the outputs of the weight
    matmuls (`aten.mm` / `aten.addmm`: q/k/v/o and MLP projections, GPT-2's Conv1D included) are
    saved, everything else -- norms, activations, attention (SDPA, batched) -- is recomputed.
    As JAX's `dots_with_no_batch_dims_saveable`, batched matmuls (`aten.bmm`: attention scores
    in eager attention) are not saved.

Why not `hf_model.gradient_checkpointing_enable()`: Hugging Face checkpoints a layer only when
the layer is in training mode (`GradientCheckpointingLayer`: `self.gradient_checkpointing and
self.training`), and our trainers keep every model in eval mode (no dropout, ever; gradients
flow in eval mode), so HF's switch would do nothing. `checkpoint_layers` checkpoints the same modules
(each decoder layer: HF's `GradientCheckpointingLayer`s) with the same non-reentrant
`torch.utils.checkpoint`, whatever the mode, by giving each layer an instance `forward` that
calls its class's forward under checkpointing. It applies only where there is a backward to
replay for -- `torch.is_grad_enabled()` -- and never with a KV cache (a recomputation would write
the cache twice): generation and the `no_grad` scoring forwards run as before. Module hooks stay
outside the checkpoint (they wrap `__call__`, as HF's own checkpointing keeps them).

Gradients are the same with any policy: the recomputation runs the same kernels on the same
inputs (bit-identical on CPU: tests/test_remat.py). Only memory and time change.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

REMAT_POLICIES = ("none", "full", "dots")

SAVED_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
"""The ops whose outputs "dots" saves: the un-batched matmuls, i.e. the weight projections (a
linear layer on [B, S, H] dispatches to aten.mm / aten.addmm on [B*S, H])."""

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _dots_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A decoder layer's instance `forward` under `checkpoint_layers`: its class's forward, checkpointed
    when there is a backward to replay for and no KV cache."""
    forward = type(self).forward.__get__(self)
    with_cache = kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in _CACHE_KWARGS)
    if self.remat == "none" or not torch.is_grad_enabled() or with_cache:
        return forward(*args, **kwargs)
    if self.remat == "dots":
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_dots_contexts, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every Hugging Face model inside `model` (HF's
    `GradientCheckpointingLayer`s; with an older transformers, the items of the backbone's layer
    list: `h` (GPT-2) or `layers`)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is not None:
        found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if found:
            return found
    return [layer for m in model.modules() for name in ("h", "layers")
            if isinstance(getattr(m, name, None), nn.ModuleList) for layer in getattr(m, name)]


def checkpoint_layers(hf_model: nn.Module, remat: str) -> None:
    """Give every decoder layer of a model being built the activation-checkpointing policy
    `remat` ("none" | "full" | "dots", validated by `ModelOptions`; see the module docstring).
    Called by the model constructors only: a built model's policy does not change."""
    layers = decoder_layers(hf_model)
    if not layers and remat != "none":
        raise ValueError(f"remat={remat!r}: no decoder layers found in {type(hf_model).__name__}")
    for layer in layers:
        layer.remat = remat
        if remat == "none":
            layer.__dict__.pop("forward", None)  # the class's forward
        else:
            layer.forward = types.MethodType(_checkpointed_forward, layer)


def get_remat(model: nn.Module) -> str:
    """The policy `checkpoint_layers` gave `model`'s decoder layers ("none" if never set)."""
    policies = {getattr(layer, "remat", "none") for layer in decoder_layers(model)}
    if len(policies) > 1:
        raise ValueError(f"get_remat: the layers of {type(model).__name__} differ: {sorted(policies)}")
    return policies.pop() if policies else "none"


__all__ = ["REMAT_POLICIES", "SAVED_OPS", "checkpoint_layers", "decoder_layers", "get_remat"]
