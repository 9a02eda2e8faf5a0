"""LoRA adapters through Hugging Face `peft`. Mirror: `ppo_jax/models/lora.py`.

    lm = load_pretrained("ckpt/", options=ModelOptions(lora_rank=8, lora_targets=("q", "v")))
    [n for n, p in lm.named_parameters() if p.requires_grad]   # the adapters only
    with adapters_disabled(lm):             # the base model's logits (PPO's reference, no copy)
        base_logits = lm(ids)
    save_adapter(lm, "out/adapter")         # PEFT format: peft.PeftModel.from_pretrained reads it
    lm = load_adapter(load_pretrained("ckpt/", options=adapter_options("out/adapter", "ckpt/")),
                      "out/adapter")

A model built with lora_rank > 0 (`causal_lm.build_with`) gets peft's LoRA layers injected into
its `transformers` model in place (`peft.inject_adapter_in_model`: the wrapped model stays a
`transformers` model, its target projections become `peft.tuners.lora` layers holding the
original as `base_layer`), with a `LoraConfig` made from the options (`ppo_rlhf.lora.peft_config`:
the targets' modules of this architecture, rank, alpha); every parameter of the wrapped model
but the adapters -- and the score head of a critic or reward model (`score.weight`: fresh, it
must learn; peft's `modules_to_save` for SEQ_CLS) -- is frozen (requires_grad False). A is
peft's kaiming-uniform bound drawn with numpy from the module's name (`ppo_rlhf.lora.init_lora_a`,
the same A as the JAX core's), B zeros.

Dropout (lora_dropout > 0): peft's own `lora_dropout` modules, which stay in eval mode (like the
whole model: the trainers never call `.train()`) except inside `adapter_dropout`, which the
trainers wrap around their training forwards and backwards. A base stored in a lower dtype
(`ModelOptions.lora_base_dtype`): `causal_lm.store_base`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError

PathLike = str | os.PathLike
ADAPTER = "default"
"""peft's name of the one adapter our models hold."""


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer
    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def apply_lora(hf_model: nn.Module, options: ModelOptions) -> None:
    """Build `hf_model` with `options`' adapters: inject peft's LoRA layers (once: a model that
    holds them already -- a `rebuild` copy -- must have been built with the same options) and
    freeze everything else. No adapters for lora_rank=0."""
    from peft import LoraConfig, inject_adapter_in_model

    present = lora_layers(hf_model)
    if present:
        if not options.lora or present[0].r[ADAPTER] != options.lora_rank or not np.isclose(
                present[0].scaling[ADAPTER], lr.scaling(options.lora_rank, options.lora_alpha)):
            raise ValueError(f"rebuild keeps the model's LoRA adapters as built (lora_rank="
                             f"{present[0].r[ADAPTER]}); got lora_rank={options.lora_rank}, "
                             f"lora_alpha={options.lora_alpha}")
        return
    if not options.lora:
        return
    model_type = hf_model.config.model_type
    modules = lr.lora_modules(model_type, options.lora_targets)
    cfg = lr.peft_config(model_type=model_type, rank=options.lora_rank, alpha=options.lora_alpha,
                         dropout=options.lora_dropout, modules=modules)
    cfg = {k: v for k, v in cfg.items() if k not in ("peft_type", "base_model_name_or_path")}
    inject_adapter_in_model(LoraConfig(**cfg), hf_model, adapter_name=ADAPTER)
    with torch.no_grad():  # A from numpy, seeded by the module's name: the JAX core's A
        for name, p in hf_model.named_parameters():
            if f".lora_A.{ADAPTER}." in name:
                module = name.split(".lora_A.", 1)[0]
                p.copy_(torch.from_numpy(lr.init_lora_a(module, p.shape[0], p.shape[1])).to(p.dtype))
    for name, p in hf_model.named_parameters():  # the adapters and a scalar model's head train
        p.requires_grad_(".lora_" in name or name == hfc.SCORE_NAME)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes without its adapters: the base model's outputs (PPO's
    reference from the policy's own weights, no copy). Restored on exit (peft's
    `enable_adapters`; the adapters stay trainable). A model without adapters: ValueError."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (built with lora_rank=0)")
    before = [not m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enable_adapters(on)


def has_adapter_dropout(model: nn.Module) -> bool:
    """Does `model` hold adapters with dropout (lora_dropout > 0: peft's `nn.Dropout`)?"""
    return bool(_dropouts(model))


def _dropouts(model: nn.Module) -> list[nn.Dropout]:
    return [m.lora_dropout[ADAPTER] for m in lora_layers(model)
            if isinstance(m.lora_dropout[ADAPTER], nn.Dropout)]


@contextlib.contextmanager
def adapter_dropout(models: nn.Module | Iterable[nn.Module], seed: int) -> Iterator[None]:
    """Inside the block, the adapters of `models` (one model or several) apply their dropout
    (peft's `lora_dropout` modules in training mode; everything else stays in eval mode, so HF
    config dropout -- set to 0 at load -- and the rest of the model are unchanged), drawing
    their masks from torch's generator seeded with `seed` (forked: the caller's random state
    is untouched). The trainers wrap the forward AND backward of a training step in it -- a
    checkpointed layer (remat) recomputes its forward in the backward with the same masks --
    with `seed` a pure function of (seed, iteration / step, minibatch, micro-batch): runs and
    resumes draw the same masks. Generation, the rollout's forwards, the reference, evaluation
    and scoring run outside it: as with rate 0. The masks are torch's own: cross-backend
    parity with dropout is impossible and is tested with rate 0. Restored on exit."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    drops = list({id(d): d for m in models for d in _dropouts(m)}.values())
    if not drops:
        yield
        return
    devices = sorted({p.device.index or 0 for m in models for p in m.parameters() if p.is_cuda})
    before = [d.training for d in drops]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            for d in drops:
                d.train(True)
            yield
        finally:
            for d, on in zip(drops, before):
                d.train(on)


# ---- PEFT format ----------------------------------------------------------------------------------
def _hf_model(model: nn.Module) -> nn.Module:
    from ppo_torch.models.heads import PolicyWithValueHead
    return (model.lm if isinstance(model, PolicyWithValueHead) else model).hf_model


def adapter_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """The adapters under their PEFT names without the 'base_model.model.' prefix:
    '<module>.lora_A.weight' [rank, in], '<module>.lora_B.weight' [out, rank] (numpy)."""
    tag = f".{ADAPTER}."
    out = {}
    for name, p in _hf_model(model).named_parameters():
        if ".lora_" in name:
            t = p.detach().cpu()
            out[name.replace(tag, ".")] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    return out


def save_adapter(model: nn.Module, path: PathLike, *, base_model: str | None = None) -> Path:
    """Write `model`'s adapters as a PEFT adapter dir (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads; `base_model`: the
    base checkpoint, recorded in the config. A `ScalarHeadModel` (a reward model: peft's SEQ_CLS
    task) also saves its score head, as peft does (`modules_to_save`), and its reward gain / bias
    (`ppo_rlhf.lora.REWARD_NORMALISATION`)."""
    from ppo_torch.models.heads import ScalarHeadModel

    options = model.options if hasattr(model, "options") else model.lm.options
    scalar = isinstance(model, ScalarHeadModel)
    head = model.hf_model.score.weight.detach().float().cpu().numpy() if scalar else None  # [1, H]
    return lr.save_model_adapter(path, model_type=_hf_model(model).config.model_type, options=options,
                                 tensors=adapter_tensors(model), head=head,
                                 reward=(model.reward_gain, model.reward_bias) if scalar else None,
                                 base_model=base_model)


adapter_options = lr.adapter_options  # backend-neutral: read from the adapter's files


@torch.no_grad()
def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """`model` (built with matching LoRA options: `adapter_options`) with the adapter weights of
    the PEFT dir `path` -- written by `save_adapter` or by `peft` -- copied in; returns `model`;
    a `ScalarHeadModel` also takes the adapter's score head (`ppo_rlhf.lora.HEAD_TENSOR`) when it
    holds one (its reward gain / bias: `load_scalar_model`). Strict: rank or scale that differ, a
    tensor missing or left unused are CheckpointErrors."""
    from ppo_torch.models.heads import ScalarHeadModel

    options = model.options if hasattr(model, "options") else model.lm.options
    config, tensors = lr.read_adapter(path)
    lr.check_adapter_fits(path, config, options)
    tag = f".{ADAPTER}."
    params = {name.replace(tag, "."): p for name, p in _hf_model(model).named_parameters() if ".lora_" in name}
    if isinstance(model, ScalarHeadModel) and lr.HEAD_TENSOR in tensors:  # a SEQ_CLS adapter's head
        params[lr.HEAD_TENSOR] = model.hf_model.score.weight
    missing = sorted(set(params) - set(tensors))
    unused = sorted(set(tensors) - set(params))
    if missing or unused:
        raise CheckpointError(f"{path}: adapter tensors missing {missing[:4]}, unused {unused[:4]} "
                              f"(targets differ from the model's {options.lora_targets}?)")
    for name, p in params.items():
        arr = np.asarray(tensors[name])
        t = torch.from_numpy(arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32))
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        p.copy_(t.to(p.dtype))
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of `model` without adapters, as a plain model (options with lora_rank 0): peft's
    merge folds (B A) * alpha / rank into each adapted projection's weight, which takes the
    LoRA layer's place. A full checkpoint of what the LoRA model computes (`save_pretrained`
    of it: `PPOTrainer.save_policy(merge=True)`, a LoRA critic). Mirror: JAX's
    `merge_adapters`. `model` is unchanged."""
    import copy

    from ppo_torch.models.causal_lm import CausalLM, build_with
    from ppo_torch.models.heads import ScalarHeadModel

    if not lora_layers(model):
        raise ValueError("merge_adapters: the model has no LoRA adapters (built with lora_rank=0)")
    merged = copy.deepcopy(model)
    options = model.options if hasattr(model, "options") else model.lm.options
    if options.base_dtype is not None:  # a base stored in lora_base_dtype: merged in float32, as JAX
        merged.float()
    with torch.no_grad():
        for name, module in list(merged.named_modules()):
            if module in lora_layers(module)[:1]:  # a LoRA layer: merged, then replaced by its base
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(merged.get_submodule(parent) if parent else merged, child, module.get_base_layer())
    for m in merged.modules():
        if isinstance(m, (CausalLM, ScalarHeadModel)):
            build_with(m, dataclasses.replace(m.options, lora_rank=0, lora_base_dtype=None))
    return merged.requires_grad_(True)


__all__ = ["adapter_dropout", "has_adapter_dropout",
           "merge_adapters", "adapters_disabled", "adapter_tensors", "save_adapter", "load_adapter", "adapter_options",
           "apply_lora", "lora_layers"]
