"""Mixed precision: `set_compute_dtype(model, "bfloat16")` -- float32 weights (and so float32
optimiser state and gradients), bfloat16 matmuls. Mirror: `ppo_torch/models/precision.py`.

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

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models.config import ModelConfig


def set_compute_dtype(model: nnx.Module, compute_dtype: str | None) -> nnx.Module:
    """Compute `model` in `compute_dtype` ("float32", "bfloat16", "float16"; None = its weights'
    dtype), in place; returns `model`. The weights are not touched. Split the model
    (`nnx.split`) after this: the dtype is static, part of the graphdef."""
    config = None
    for _, node in nnx.iter_graph(model):
        if isinstance(getattr(node, "config", None), ModelConfig):
            node.config = config = dataclasses.replace(node.config, compute_dtype=compute_dtype)
    if config is None:
        raise TypeError(f"set_compute_dtype: {type(model).__name__} holds no ModelConfig")
    dt = jnp.dtype(compute_dtype or config.dtype)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            node.dtype = dt
    return model


def cast_model(model: nnx.Module, dtype: str) -> nnx.Module:
    """A copy of `model` whose weights AND activations are in `dtype` ("float32", "bfloat16";
    `ModelConfig.dtype`), as if it had been loaded with that dtype: its parameters cast, its
    configs' dtype replaced (norms, softmaxes and logits stay float32). Its compute dtype is kept.
    The frozen models' dtype (`PPOConfig.frozen_dtype`). Abstract models (planning) too."""
    graphdef, state = nnx.split(model)
    dt = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)

    new = nnx.merge(graphdef, jax.tree.map(cast, state))
    for _, node in nnx.iter_graph(new):
        if isinstance(getattr(node, "config", None), ModelConfig):
            node.config = dataclasses.replace(node.config, dtype=dt.name)
    mixed = _has_compute_dtype(new)  # matmuls keep their compute dtype; else they follow dtype
    for _, node in nnx.iter_graph(new):
        if isinstance(node, nnx.Linear):
            node.param_dtype = dt
            node.dtype = jnp.dtype(node.dtype if mixed else dt)
        elif isinstance(node, nnx.Embed):
            node.dtype = node.param_dtype = dt
    return new


def _has_compute_dtype(model: nnx.Module) -> bool:
    return any(isinstance(getattr(n, "config", None), ModelConfig) and n.config.compute_dtype
               for _, n in nnx.iter_graph(model))


__all__ = ["set_compute_dtype", "cast_model"]
