"""A model's options and dtype, fixed when it is built, and the models built from another's
weights. Mirror: `ppo_torch/models/precision.py`.

    lm = load_pretrained("ckpt/", options=ModelOptions(compute_dtype="bfloat16", remat="dots"))
    model_options(lm)                                    # what it was built with
    ref = rebuild(lm, options=model_options(lm).frozen(), copy=True)   # PPO's frozen reference
    half = cast_model(ref, "bfloat16")                   # PPOConfig.frozen_dtype

`rebuild` constructs the model's class again from its config with the new options / dtype
(under `nnx.eval_shape`: nothing allocated) and puts the old weights into it, so a derived model
is built like a loaded one; the model it came from is never changed.

Mixed precision (`ModelOptions.compute_dtype="bfloat16"`): float32 weights (and so float32
optimiser state and gradients), bfloat16 matmuls.

What runs in which dtype with weights in `dtype` and compute in `compute_dtype` (ModelConfig):
  * every projection of the blocks (`layers.linear`: q/k/v/o, MLP) casts its input, kernel
    and bias to compute_dtype and returns compute_dtype -- so attention inputs and MLP
    activations are in compute_dtype (dot products accumulate in float32);
  * the LM head rounds its input to compute_dtype and accumulates float32 logits
    (`CausalLM.project_head`); value and score heads read the float32 hidden states in float32;
  * embeddings, the residual stream and the norms stay in `dtype` (an add of a float32 stream
    and a bfloat16 projection is float32), as `torch.autocast` does with float32 weights;
  * softmaxes, log-softmax, entropies, losses and advantages are float32 (`layers.upcast`,
    `ppo_jax.losses`);
  * the KV cache defaults to compute_dtype.
The backward follows: gradients of the float32 weights are float32 (the casts' transposes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.abstract import copy_arrays, is_abstract
from ppo_jax.models.causal_lm import CausalLM
from ppo_jax.models.heads import PolicyWithValueHead, ScalarHeadModel
from ppo_rlhf.config import ModelOptions

Model = CausalLM | ScalarHeadModel | PolicyWithValueHead


def model_options(model: Model) -> ModelOptions:
    """The options `model` was built with."""
    return model.config.options


def _construct(model: Model, config: Any) -> Model:
    """A new, abstract model of `model`'s class and static attributes, built from `config`."""
    rngs = nnx.Rngs(0)
    if isinstance(model, PolicyWithValueHead):
        return PolicyWithValueHead(CausalLM(config, rngs=rngs), np.zeros((1, config.hidden_size), np.float32))
    if isinstance(model, ScalarHeadModel):
        return ScalarHeadModel(config, rngs=rngs, reward_gain=model.reward_gain,
                               reward_bias=model.reward_bias)
    if isinstance(model, CausalLM):
        return CausalLM(config, rngs=rngs)
    raise TypeError(f"expected a CausalLM, ScalarHeadModel or PolicyWithValueHead, got {type(model).__name__}")


def rebuild(model: Model, *, options: ModelOptions | None = None, dtype: str | None = None,
            copy: bool = False) -> Model:
    """`model`'s class built again with `options` and weights in `dtype` (each default: the
    model's), holding `model`'s weights -- cast to `dtype`, copied first with copy=True (for a
    model that must not share buffers with one whose arrays are donated: PPO's frozen reference
    of the trained policy). LoRA options on a model without adapters add fresh ones
    (`lora.init_lora_param`). Abstract models (planning) stay abstract. `model` is unchanged."""
    check_same_adapters(model.config.options, options)
    config = dataclasses.replace(model.config, options=model.config.options if options is None else options,
                                 dtype=model.config.dtype if dtype is None else jnp.dtype(dtype).name)
    abstract = nnx.eval_shape(lambda: _construct(model, config))
    graphdef = nnx.graphdef(abstract)
    state = nnx.state(model)
    if copy:
        state = copy_arrays(state)
    dt = jnp.dtype(config.dtype)
    state = jax.tree.map(_cast_to(dt), state)
    if config.options.lora and not model.config.options.lora:  # adapters added: fresh ones
        from ppo_jax.models.lora import LoRADropoutKey, init_lora_param
        from ppo_jax.models.stack import stacked_modules

        stacks = stacked_modules(abstract)
        fresh = [(p, v if is_abstract(state) else
                  v.replace(jnp.asarray(init_lora_param(p, v.shape, dt, config.model_type, stacks))))
                 for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.LoRAParam))]
        fresh += [(p, v if is_abstract(state) else v.replace(jnp.zeros(v.shape, v.dtype)))
                  for p, v in nnx.to_flat_state(nnx.state(abstract, LoRADropoutKey))]
        return store_base(nnx.merge(graphdef, state, nnx.from_flat_state(fresh)))
    return store_base(nnx.merge(graphdef, state))


def store_base(model: Model) -> Model:
    """`model` with its frozen base weights in `ModelOptions.lora_base_dtype` (a LoRA model built
    with one; any other model unchanged): every `nnx.Param` that is not trained
    (`lora.trained_params`: the adapters, a score / value head) cast to it, the trained ones
    kept in the model's dtype. The forward needs no change: every projection casts its kernel
    to the compute dtype anyway (the same dtype, so the same products as float32 weights), the
    embeddings are read into the model's dtype (`nnx.Embed(dtype=...)`), the norms scale in
    float32 (`layers`): the residual stream, norms and logits stay float32. Mirror: torch's
    `causal_lm.build_with`. Abstract models (planning) too."""
    from ppo_jax.models.lora import trained_params

    dt = model_options(model).base_dtype
    if dt is None:
        return model
    dt = jnp.dtype(dt)
    graphdef, trained, base, rest = nnx.split(model, trained_params(model), nnx.Param, ...)
    return nnx.merge(graphdef, trained, jax.tree.map(_cast_to(dt), base), rest)


def _cast_to(dt: Any) -> Callable[[Any], Any]:
    """x -> x in `dt` if it is a floating array of another dtype (abstract ones stay abstract),
    else x itself (no copy)."""
    def cast(x: Any) -> Any:
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dt:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)

    return cast


def check_same_adapters(old: ModelOptions, new: ModelOptions | None) -> None:
    """`rebuild` keeps a model's LoRA adapters as they were built (the same parameters): options
    that drop or reshape them are a ValueError. A model without adapters may get fresh ones (a
    LoRA critic from a reward model; as the torch core's peft injection)."""
    fields = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_base_dtype")
    if new is not None and old.lora and any(getattr(old, f) != getattr(new, f) for f in fields):
        raise ValueError(f"rebuild keeps the model's LoRA adapters as built (lora_rank={old.lora_rank}, "
                         f"lora_alpha={old.lora_alpha}, lora_targets={old.lora_targets}); got "
                         f"lora_rank={new.lora_rank}, lora_alpha={new.lora_alpha}, lora_targets={new.lora_targets}")


def cast_model(model: Model, dtype: str) -> Model:
    """`model` with its weights AND activations in `dtype` ("float32", "bfloat16";
    `ModelConfig.dtype`), as if it had been loaded with that dtype (norms, softmaxes and logits
    stay float32; its options, compute dtype included, are kept): `rebuild(model, dtype=dtype)`.
    The frozen models' dtype (`PPOConfig.frozen_dtype`). Abstract models (planning) too."""
    return rebuild(model, dtype=dtype)


__all__ = ["model_options", "rebuild", "cast_model", "check_same_adapters", "store_base"]
