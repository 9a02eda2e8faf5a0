"""A model's options and dtype, fixed when it is built, and the models built from another's
weights. Mirror: `ppo_jax/models/precision.py`.

    lm = load_pretrained("ckpt/", options=ModelOptions(compute_dtype="bfloat16", remat="dots"))
    model_options(lm)                                    # what it was built with
    ref = rebuild(lm, options=model_options(lm).frozen(), copy=True)   # PPO's frozen reference
    half = cast_model(ref, "bfloat16")                   # PPOConfig.frozen_dtype

`rebuild` makes new module objects (a deep copy of the structure) around the old weights -- the
same tensors unless they are copied or cast -- and builds them with the new options
(`causal_lm.build_with`, as the constructors do); the model it came from is never changed.

Mixed precision (`ModelOptions.compute_dtype`): each model's backbone runs under
`torch.autocast(device, dtype=compute_dtype)` (`causal_lm.backbone_hidden`): the matmuls
(linear / Conv1D, attention) take compute_dtype inputs, while embeddings, the residual stream
and the norms stay in the weights' dtype. The LM head runs outside autocast on inputs rounded
to compute_dtype with float32 accumulation and float32 logits (`causal_lm.project`); value and
score heads read the hidden states in float32. Log-softmax, entropies, losses and advantages
are float32 (`ppo_torch.losses`).
"""

from __future__ import annotations

import copy as _copy
import itertools

import torch
from torch import nn

from ppo_rlhf.config import ModelOptions
from ppo_torch.models.causal_lm import CausalLM, build_with
from ppo_torch.models.heads import PolicyWithValueHead, ScalarHeadModel

Model = CausalLM | ScalarHeadModel | PolicyWithValueHead


def model_options(model: Model) -> ModelOptions:
    """The options `model` was built with."""
    if not isinstance(model, (CausalLM, ScalarHeadModel, PolicyWithValueHead)):
        raise TypeError(f"expected a CausalLM, ScalarHeadModel or PolicyWithValueHead, got {type(model).__name__}")
    return model.options


def rebuild(model: Model, *, options: ModelOptions | None = None, dtype: str | None = None,
            copy: bool = False) -> Model:
    """`model` built again with `options` and weights in `dtype` (each default: the model's):
    new modules around `model`'s weights -- cast to `dtype`, copied with copy=True (a model
    trained or frozen apart from its source: PPO's reference of the trained policy), else the
    same tensors in new `Parameter`s (so requires_grad_ or a move of one leaves the other
    alone). `model` is unchanged."""
    model_options(model)  # the type check
    dt = None if dtype is None else getattr(torch, dtype)
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        new = t.detach()
        if dt is not None and new.is_floating_point() and new.dtype != dt:
            new = new.to(dt)
        elif copy:
            new = new.clone()
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    new_model = _copy.deepcopy(model, memo)
    for m in new_model.modules():
        if isinstance(m, (CausalLM, ScalarHeadModel)):
            build_with(m, m.options if options is None else options)
    return new_model


def cast_model(model: Model, dtype: str) -> Model:
    """`model` with its weights AND activations in `dtype` ("float32", "bfloat16"), as if it had
    been loaded with that dtype (logits, log-probs and scores stay float32; its options are
    kept): `rebuild(model, dtype=dtype)`. The frozen models' dtype (`PPOConfig.frozen_dtype`)."""
    return rebuild(model, dtype=dtype)


__all__ = ["model_options", "rebuild", "cast_model"]
