"""Abstract arrays: the trainers built without weights, for compiling (`ppo_jax.plan`).

A model built with `load_pretrained(dir, abstract=True)` (config.json alone) holds a
`jax.ShapeDtypeStruct` where a real one holds an array. The trainers' construction runs
unchanged on such models -- the few steps that compute arrays (a frozen copy, a cast, the
optimiser's initial state) go through `evaluate`, which traces them with `jax.eval_shape`
when their inputs are abstract, and `ppo_jax.parallel.Placement` gives an abstract array the
sharding of its rule instead of copying it to a device. So a planned trainer has the same
roles, shardings and jitted programs as a real one, and each program lowers on
`ShapeDtypeStruct`s for devices that are not there (`jax.experimental.topologies`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def is_abstract(tree: Any) -> bool:
    """Does `tree` hold a `jax.ShapeDtypeStruct` (an array without a value)?"""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def evaluate(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or its abstract result (`jax.eval_shape`) when `args` hold abstract arrays."""
    return jax.eval_shape(fn, *args) if is_abstract(args) else fn(*args)


def copy_arrays(tree: Any) -> Any:
    """A copy of every array of `tree`; an abstract array's copy is a new abstract array (a copy
    is memory of its own: the plan counts arrays by identity, `tree_nbytes`)."""
    def copy(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type)
        return jnp.copy(x)

    return jax.tree.map(copy, tree)


def nbytes(x: Any) -> int:
    """Bytes of an array, or of ONE device's shard of it when it is sharded (abstract arrays
    with a `sharding` too)."""
    sharding = getattr(x, "sharding", None)
    shape = tuple(x.shape)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(x.dtype).itemsize


def tree_nbytes(tree: Any, *, unique: bool = True) -> int:
    """`nbytes` summed over a tree: the bytes one device holds of it -- each array once, where
    several leaves are the same array (a LoRA critic's base weights are the reward model's);
    unique=False counts every leaf (as XLA's argument size counts an array passed twice)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    if unique:
        leaves = list({id(x): x for x in leaves}.values())
    return sum(nbytes(x) for x in leaves)


__all__ = ["is_abstract", "evaluate", "copy_arrays", "nbytes", "tree_nbytes"]
