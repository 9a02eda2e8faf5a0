"""LoRA adapters on the scanned, stacked layers. Mirror: `ppo_torch/models/lora.py` (`peft`).

    lm = load_pretrained("ckpt/", options=ModelOptions(lora_rank=8, lora_targets=("q", "v")))
    nnx.state(lm, nnx.LoRAParam)            # the adapters: the only parameters to train
    with adapters_disabled(lm):             # the base model's logits (PPO's reference, no copy)
        base_logits = lm(ids)
    save_adapter(lm, "out/adapter")         # PEFT format: peft.PeftModel.from_pretrained reads it
    lm = load_adapter(load_pretrained("ckpt/", options=adapter_options("out/adapter", "ckpt/")),
                      "out/adapter")

A target projection (`ppo_rlhf.lora.LORA_MODULES`; `layers.linear(..., lora=module)`) is built as
a `LoRALinear`: the `nnx.Linear` it replaces -- same kernel and bias, same names, so checkpoints
load as before -- plus `lora_a` [in, rank] and `lora_b` [rank, out], computing
y = x W + b + (x A B) * alpha / rank in the compute dtype (as peft: the base output, plus the
adapter's term). Built inside the blocks' `nnx.vmap`, the pair gets a leading layer axis like
every other parameter of a stack ([L, in, rank]), and the scan over layers slices it with the
rest: no Python loop over layers.

Why our own module and not flax's `nnx.LoRA` / `nnx.LoRALinear` or `qwix`: flax's modules have no
alpha / rank scaling and no way to switch the adapters off (needed for the reference), and
`nnx.LoRALinear` nests the pair under `.lora` (a different parameter path from the HF-named
`nnx.Linear`); qwix rewrites a model's modules by intercepting their calls, which does not see
the per-layer slices our scan hands each block. We do use flax's variable type
`nnx.LoRAParam` (a subclass of `nnx.Param`) for the pair, so `nnx.state(model, nnx.LoRAParam)`,
`nnx.DiffState` / `nnx.Optimizer(wrt=nnx.LoRAParam)` select exactly the adapters, and the base
weights are the `nnx.Param`s that are not `nnx.LoRAParam` (`BASE_PARAMS`).

Dropout (lora_dropout > 0) as peft's, on the adapter's input, only inside `adapter_dropout` (the
trainers' training steps); the masks come from a key per projection and layer (`LoRADropoutKey`,
stacked like the weights). A base stored in a lower dtype (`ModelOptions.lora_base_dtype`):
`precision.store_base`.

Initialisation as peft's: A kaiming-uniform (bound 1 / sqrt(in)), B zeros -- so a fresh adapter
changes nothing. When a model is loaded from a checkpoint (`loading._build`), A is drawn with
numpy from a seed fixed by its HF module name (`init_lora_param`, `ppo_rlhf.lora.init_lora_a`:
the same A as the torch core's).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError

Array = jax.Array
PathLike = str | os.PathLike

ADAPTER_PARAMS = nnx.LoRAParam
"""The filter of the adapters' parameters (what a LoRA model trains)."""
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
"""The filter of the base weights (frozen in a LoRA model; what a checkpoint holds)."""


class LoRADropoutKey(nnx.Variable):
    """The raw PRNG key data (`jax.random.key_data`, uint32) of a `LoRALinear`'s dropout masks:
    in a stack [L, 2], one key per layer, so each layer draws its own mask. Set inside the
    training step by `adapter_dropout`; not a parameter (never trained, never saved)."""


class LoRALinear(nnx.Linear):
    """`nnx.Linear` plus a LoRA pair (see the module docstring); `adapters_enabled` (static,
    part of the graphdef) switches the adapter's term off (`adapters_disabled`).

    With dropout (rate > 0) the adapter reads dropout(x): each element kept with probability
    1 - rate and scaled by 1 / (1 - rate) (peft's `nn.Dropout`), only while `dropout_active`
    (static; set by `adapter_dropout` for the forwards that are differentiated) -- otherwise
    it computes exactly what rate 0 computes. Its masks come from `dropout_key`; with rate 0
    the module holds no key and its programs are those of a model built without dropout."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs, dropout: float = 0.0):
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        bound = 1.0 / np.sqrt(in_features)  # peft: kaiming_uniform_(a=sqrt(5)) on A [rank, in]
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank),
                                                       param_dtype, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype))
        self.scaling = lr.scaling(rank, alpha)
        self.adapters_enabled = True
        self.dropout = float(dropout)
        self.dropout_active = False
        if self.dropout:
            self.dropout_key = LoRADropoutKey(jnp.zeros(_KEY_SHAPE, jnp.uint32))

    def __call__(self, x: Array) -> Array:
        y = super().__call__(x)
        if not self.adapters_enabled:
            return y
        dt = y.dtype
        x = x.astype(dt)
        if self.dropout and self.dropout_active:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, dt), jnp.zeros((), dt))
        a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
        return y + ((x @ a) @ b) * jnp.asarray(self.scaling, dt)


_KEY_SHAPE = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
"""The shape of one raw PRNG key (threefry: (2,))."""


ADAPTER_RANK_AXIS = {"lora_a": -1, "lora_b": -2}
"""The rank axis of each adapter parameter ([..., in, rank] / [..., rank, out])."""


def adapter_rank_axis(path: Any) -> int | None:
    """The rank axis (negative index) of the adapter parameter at `path` -- NNX path parts or a
    `jax.tree_util` key path (optimiser states included) --, None for any other parameter.
    `ppo_jax.parallel.param_spec` never splits it."""
    for k in path:
        axis = ADAPTER_RANK_AXIS.get(getattr(k, "key", getattr(k, "name", k)))
        if axis is not None:
            return axis
    return None


def lora_linear_or_none(in_features: int, out_features: int, *, module: str | None, config: Any,
                        use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> LoRALinear | None:
    """A `LoRALinear` when the model's options put an adapter on `module` (a
    `ppo_rlhf.lora.LORA_MODULES` path), else None (the caller builds a plain nnx.Linear)."""
    options = config.options
    if module is None or not options.lora or module not in lr.lora_modules(config.model_type,
                                                                            options.lora_targets):
        return None
    return LoRALinear(in_features, out_features, rank=options.lora_rank, alpha=options.lora_alpha,
                      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      dropout=options.lora_dropout)


def check_options(model_type: str, options: ModelOptions) -> None:
    """What a JAX model can be built with: the targets exist in `model_type` (ValueError)."""
    if not options.lora:
        return
    lr.lora_modules(model_type, options.lora_targets)


def init_lora_param(path: tuple, shape: tuple, dtype, model_type: str, stacks: dict) -> np.ndarray:
    """The initial value of an adapter parameter at `path` (nnx path, leaf 'lora_a' or 'lora_b';
    shape [L, in, rank] / [L, rank, out] in a stack): B zeros; A per layer
    `ppo_rlhf.lora.init_lora_a` of its HF module name (numpy, seeded by the name: the torch
    core's peft adapters start from the same A)."""
    if path[-1] == "lora_b":
        return np.zeros(shape, dtype)
    names = _adapter_names(path, model_type, stacks)
    rank, in_features = shape[-1], shape[-2]
    arrs = [lr.init_lora_a(n, rank, in_features).T for n in names]
    return (np.stack(arrs) if len(shape) == 3 else arrs[0]).astype(dtype)


def trained_params(model: nnx.Module) -> Any:
    """The filter of the parameters a trainer trains in `model`: every `nnx.Param` without LoRA;
    with LoRA the adapters (`ADAPTER_PARAMS`) and the task heads on top of the backbone -- a
    critic's or reward model's `score_head`, a shared trunk's `value_head` (fresh, so they must
    learn; peft's `modules_to_save` for SEQ_CLS) -- and nothing of the base model (its LM head
    included). Mirror: `ppo_torch.models.lora.apply_lora`'s requires_grad."""
    if not _core(model).config.options.lora:
        return nnx.Param
    return nnx.Any(ADAPTER_PARAMS, nnx.All(nnx.Param, nnx.Any(nnx.PathContains("score_head"),
                                                              nnx.PathContains("value_head"))))


def lora_modules_of(model: nnx.Module) -> list[LoRALinear]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Inside the block, `model` computes without its adapters: the base model's outputs (PPO's
    reference from the policy's own weights, no copy). `nnx.split` inside the block gives a
    graphdef with the adapters off (a separate jitted program). Restored on exit. A model
    without adapters: ValueError (there is nothing to disable -- a caller that expected them
    would silently get the same model)."""
    modules = lora_modules_of(model)
    if not modules:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (built with lora_rank=0)")
    before = [m.adapters_enabled for m in modules]
    try:
        for m in modules:
            m.adapters_enabled = False
        yield model
    finally:
        for m, on in zip(modules, before):
            m.adapters_enabled = on


def has_adapter_dropout(model: nnx.Module) -> bool:
    """Does `model` hold adapters with dropout (lora_dropout > 0)?"""
    return any(m.dropout for m in lora_modules_of(model))


@contextlib.contextmanager
def adapter_dropout(model: nnx.Module, key: Array) -> Iterator[nnx.Module]:
    """Inside the block, `model`'s adapters apply their dropout (training mode), with masks
    drawn from `key`: adapted projection j (in `nnx.iter_graph` order) of layer l uses
    `split(fold_in(key, j), L)[l]` -- a distinct mask per projection and per layer, a pure
    function of `key`. The trainers call it inside the jitted training step, on the model they
    just merged, with `key` a pure function of (seed, iteration / step, minibatch,
    micro-batch); nothing else (generation, the rollout's forwards, the reference, evaluation,
    scoring) ever sets it, so those compute as with rate 0. Cross-backend parity cannot match
    random masks (torch draws its own): parity is tested with rate 0. Restored on exit; a
    model without dropout is unchanged (no key is used)."""
    modules = [m for m in lora_modules_of(model) if m.dropout]
    before = [(m.dropout_active, m.dropout_key) for m in modules]
    try:
        for j, m in enumerate(modules):
            k = jax.random.fold_in(key, j)
            shape = m.dropout_key.shape
            keys = jax.random.split(k, shape[0]) if len(shape) == 2 else k
            # a new variable, not a write into the old one: a merged model may share its
            # variables with the state it came from (a trainer's, outside this trace)
            m.dropout_key = LoRADropoutKey(jax.random.key_data(keys))
            m.dropout_active = True
        yield model
    finally:
        for m, (on, k) in zip(modules, before):
            m.dropout_active, m.dropout_key = on, k


# ---- PEFT format ----------------------------------------------------------------------------------
def _core(model: nnx.Module) -> nnx.Module:
    from ppo_jax.models.heads import PolicyWithValueHead
    return model.lm if isinstance(model, PolicyWithValueHead) else model


def _adapter_names(path: tuple, model_type: str, stacks: dict) -> list[str]:
    """The HF module names (one per layer in a stack) of the projection holding adapter `path`."""
    from ppo_jax.models.loading import hf_names
    names, _, _ = hf_names(path[:-1] + ("kernel",), model_type, stacks)
    return [n.removesuffix(".weight") for n in names]


def adapter_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapters under their PEFT names without the 'base_model.model.' prefix, one tensor
    per layer, in nn.Linear layout: '<module>.lora_A.weight' [rank, in], '.lora_B.weight'
    [out, rank] (float32 numpy, or the model's dtype)."""
    from ppo_jax.models.stack import stacked_modules
    model = _core(model)
    stacks = stacked_modules(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, ADAPTER_PARAMS)):
        arr = np.asarray(var[...])
        key = "lora_A" if path[-1] == "lora_a" else "lora_B"
        names = _adapter_names(path, model.config.model_type, stacks)
        for name, a in zip(names, arr if arr.ndim == 3 else [arr]):  # a stack: one per layer
            out[f"{name}.{key}.weight"] = a.T
    return out


def save_adapter(model: nnx.Module, path: PathLike, *, base_model: str | None = None) -> Path:
    """Write `model`'s adapters as a PEFT adapter dir (`adapter_config.json`,
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(<the transformers base
    model>, path)` loads; `base_model`: the base checkpoint, recorded in the config. A
    `ScalarHeadModel` (a reward model: peft's SEQ_CLS task) also saves its score head, as peft
    does (`modules_to_save`), and its reward gain / bias (`ppo_rlhf.lora.REWARD_NORMALISATION`)."""
    from ppo_jax.models.heads import ScalarHeadModel

    core = _core(model)
    scalar = isinstance(core, ScalarHeadModel)
    head = np.asarray(core.score_head.kernel[...], np.float32).T if scalar else None  # [1, H]
    return lr.save_model_adapter(path, model_type=core.config.model_type, options=core.config.options,
                                 tensors=adapter_tensors(core), head=head,
                                 reward=(core.reward_gain, core.reward_bias) if scalar else None,
                                 base_model=base_model)


adapter_options = lr.adapter_options  # backend-neutral: read from the adapter's files


def load_adapter(model: nnx.Module, path: PathLike) -> nnx.Module:
    """`model` (built with matching LoRA options: `adapter_options`) with the adapter weights of
    the PEFT dir `path` -- written by `save_adapter` or by `peft` -- as a new model (the base
    weights shared, `model` unchanged); a `ScalarHeadModel` also takes the adapter's score head
    (`ppo_rlhf.lora.HEAD_TENSOR`) when it holds one (its reward gain / bias: `load_scalar_model`).
    Strict: rank or scale that differ, a tensor missing or left unused are CheckpointErrors."""
    from ppo_jax.models.heads import ScalarHeadModel
    from ppo_jax.models.stack import stacked_modules
    core = _core(model)
    options = core.config.options
    config, tensors = lr.read_adapter(path)
    lr.check_adapter_fits(path, config, options)
    stacks = stacked_modules(core)
    graphdef, state = nnx.split(model)
    adapters = nnx.state(core, ADAPTER_PARAMS)
    used, missing, new = set(), [], {}
    for p, var in nnx.to_flat_state(adapters):
        key = "lora_A" if p[-1] == "lora_a" else "lora_B"
        names = [f"{n}.{key}.weight" for n in _adapter_names(p, core.config.model_type, stacks)]
        absent = [n for n in names if n not in tensors]
        if absent:
            missing.extend(absent)
            continue
        arrs = [np.asarray(tensors[n]).T for n in names]
        arr = np.stack(arrs) if var[...].ndim == 3 else arrs[0]
        if arr.shape != tuple(var.shape):
            raise CheckpointError(f"{path}: {names[0]} has shape {arrs[0].T.shape}, the model expects "
                                  f"{tuple(var.shape[-2:])[::-1]}")
        new[p] = jnp.asarray(arr, var.dtype)
        used.update(names)
    if isinstance(core, ScalarHeadModel) and lr.HEAD_TENSOR in tensors:  # a SEQ_CLS adapter's head
        kernel = core.score_head.kernel
        head = np.asarray(tensors[lr.HEAD_TENSOR]).T
        if head.shape != tuple(kernel.shape):
            raise CheckpointError(f"{path}: {lr.HEAD_TENSOR} has shape {head.T.shape}, the model expects "
                                  f"{tuple(kernel.shape)[::-1]}")
        new[("score_head", "kernel")] = jnp.asarray(head, kernel.dtype)
        used.add(lr.HEAD_TENSOR)
    unused = sorted(set(tensors) - used)
    if missing or unused:
        raise CheckpointError(f"{path}: adapter tensors missing {missing[:4]}, unused {unused[:4]} "
                              f"(targets differ from the model's {options.lora_targets}?)")
    prefix = ("lm",) if core is not model else ()
    flat = [(path_, (var.replace(new[path_[len(prefix):]]) if path_[:len(prefix)] == prefix
                     and path_[len(prefix):] in new else var))
            for path_, var in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """`model` without adapters, as a plain model of its class (options with lora_rank 0): each
    adapted projection's kernel W + (A B) * alpha / rank (computed in float32), every other
    weight shared. A full checkpoint of what the LoRA model computes (`save_pretrained` of it:
    `PPOTrainer.save_policy(merge=True)`, a LoRA critic). Mirror: torch's `merge_adapters`
    (peft's merge). `model` is unchanged."""
    import dataclasses

    from ppo_jax.models.precision import _construct

    core = _core(model)
    options = core.config.options
    if not options.lora:
        raise ValueError("merge_adapters: the model has no LoRA adapters (built with lora_rank=0)")
    scale = lr.scaling(options.lora_rank, options.lora_alpha)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Any(ADAPTER_PARAMS, LoRADropoutKey)))))
    dt = jnp.dtype(core.config.dtype)  # a base stored in lora_base_dtype: merged into the model's dtype
    flat = {p: (v.replace(v[...].astype(dt)) if isinstance(v, nnx.Param) and jnp.issubdtype(v.dtype, jnp.floating)
                else v) for p, v in flat.items()}
    adapters = dict(nnx.to_flat_state(nnx.state(model, ADAPTER_PARAMS)))
    for path, a in adapters.items():
        if path[-1] != "lora_a":
            continue
        b, kernel = adapters[path[:-1] + ("lora_b",)], flat[path[:-1] + ("kernel",)]
        delta = jnp.einsum("...ir,...ro->...io", a[...].astype(jnp.float32), b[...].astype(jnp.float32))
        w = kernel[...]
        flat[path[:-1] + ("kernel",)] = kernel.replace((w.astype(jnp.float32) + scale * delta).astype(w.dtype))
    config = dataclasses.replace(model.config, options=dataclasses.replace(options, lora_rank=0,
                                                                             lora_base_dtype=None))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: _construct(model, config)))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


__all__ = ["LoRALinear", "LoRADropoutKey", "adapter_dropout", "has_adapter_dropout",
           "merge_adapters", "ADAPTER_PARAMS", "adapter_rank_axis", "ADAPTER_RANK_AXIS",
           "BASE_PARAMS", "adapters_disabled", "adapter_tensors",
           "save_adapter", "load_adapter", "adapter_options", "check_options", "init_lora_param",
           "trained_params"]
