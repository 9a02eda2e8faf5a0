"""`ScannedBlocks`: a model's transformer blocks with their parameters stacked along a leading
layer axis, run by ONE `jax.lax.scan` -- the only place the layer loop lives (all three
architecture files use it), so each architecture file reads like nanoGPT:

    self.h = ScannedBlocks(lambda rngs: GPT2Block(config, rngs=rngs), config.num_layers, rngs=rngs,
                           options=config.options)
    ...
    x, cache = self.h(x, mask, per_layer=(layer_number,), cache=cache, cache_index=cache_index)

Why a scan: an unrolled Python loop puts num_layers copies of the block into every XLA program,
so compile time grows with depth; the scan's body is traced and compiled once, whatever the
depth (MaxText's `scan_layers`; measured by `python -m benchmarks.compile_depth`). In the backward
the residual-stream gradient is the scan's carry, materialised once per layer.

Parameters. `ScannedBlocks.stack` is ONE block module built by `nnx.vmap` over `nnx.split_rngs`, each of
its parameters with a leading axis of size num_layers: `model.backbone.h.stack.attn.c_attn.kernel`
is [L, H, 3H] and `[...][i]` is layer i's kernel. Hugging Face names map to those slices
(`transformer.h.{i}.attn.c_attn.weight` <-> `h.stack...[i]`, `loading.py`); a parameter whose
path goes through `STACK` has a leading layer axis (`is_stacked`, used by the sharding rules).

The call. For i = 0 .. L-1, with layer i's parameters:

    x, cache_view = block(x, *args, *(a[i] for a in per_layer), cache_view, cache_index)

`args` are the same for every layer (mask, rotary cos/sin); `per_layer` are arrays with a leading
axis L, sliced by the scan (GPT-2's layer number). With a KV cache (`layers.Cache`, stacked
[L, B, n_kv, max_len, D]) the whole cache is the scan's carry and block i sees it as
`LayerCache(cache, i)`: it writes its new keys/values into layer i's slots in place (a
decode step writes one slot per layer, not a copy of the cache). Returns (x, cache or None).

Cost: the scan reads layer i's weights (and cache) as dynamic slices of the stacked arrays.
XLA:CPU copies such a slice before a matmul, so a decode step, which reads every weight for
only B tokens, pays a copy of the weights and of layer i's KV cache; the scoring forwards and
the update (B x T tokens per weight read) hardly notice. Where the time goes, per kernel:
`python -m benchmarks.kernels` and benchmarks/README.md. On accelerators XLA can feed a matmul
from a dynamic slice (TPU fusions; XLA:GPU's dynamic-slice fusion).

Activation checkpointing (`remat`, one of the `ppo_rlhf.config.ModelOptions` a model is built
with: the architecture files pass `config.options` to their `ScannedBlocks`; static, part of the
graphdef, so the jitted programs of a trainer are specialised on it; the trainers build the
models they differentiate -- PPO's policy and critic, the reward model, the SFT model -- with
their config's `remat`, the others without; the torch twin is `ppo_torch.models.remat`):
  * "none": the backward keeps every intermediate of every layer (fastest, most memory);
  * "full": each layer keeps only its input; the backward recomputes the layer's forward
    (`jax.checkpoint` with nothing saveable): activation memory ~ one [B, S, H] per layer;
  * "dots": keeps the outputs of the weight matmuls (`jax.checkpoint_policies.
    dots_with_no_batch_dims_saveable`: q/k/v/o and MLP projections), recomputes norms,
    activations and the attention scores (batched dots) -- MaxText's "minimal" policy.
Gradients are the same with any of the three, up to float32 rounding where XLA fuses the
recomputed forward differently (tested); only memory and time change. Without
differentiation (generation, scoring) the policy changes nothing.

Unrolling (`ModelOptions.scan_unroll`, static like `remat`; the trainers build every model they
run with their config's `scan_unroll`): `jax.lax.scan(..., unroll=True)`
lowers the scan as L copies of the block with static slices of the stacked parameters instead
of a loop with dynamic ones -- the same arithmetic, no loop and no per-layer weight copies, but
a program that grows with depth again (compile time ~ L). For shallow models on CPU, where the
loop's overhead and the copies are a visible share of each layer's work (benchmarks/README.md);
the default stays the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ppo_jax.models.layers import Cache, LayerCache
from ppo_rlhf.config import ModelOptions

Array = jax.Array

STACK = "stack"
"""The attribute of `ScannedBlocks` holding the stacked block: a parameter path through it has a
leading layer axis."""

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ScannedBlocks(nnx.Module):
    """`num_layers` blocks made by `make_block(rngs)`, parameters stacked, run by a scan (see the
    module docstring)."""

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 rngs: nnx.Rngs, options: ModelOptions = ModelOptions()):
        self.num_layers = num_layers
        self.remat = options.remat  # validated by ModelOptions
        self.unroll = options.scan_unroll

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers)
        def stacked(rngs: nnx.Rngs) -> nnx.Module:
            return make_block(rngs)

        self.stack = stacked(rngs)  # the attribute named by STACK

    def __call__(self, x: Array, *args: Any, per_layer: Sequence[Any] = (),
                 cache: Cache | None = None, cache_index=None) -> tuple[Array, Cache | None]:
        graphdef, params = nnx.split(self.stack)

        def layer(x, cache, i, layer_params, layer_args):
            block = nnx.merge(graphdef, layer_params)
            view = None if cache is None else LayerCache(cache, i)
            x, view = block(x, *args, *layer_args, view, cache_index)
            return x, None if view is None else view.cache

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            # prevent_cse=False: inside a scan CSE cannot undo the recomputation (JAX's advice)
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)

        def body(carry, xs):
            return layer(*carry, *xs), None

        xs = (jnp.arange(self.num_layers, dtype=jnp.int32), params,
              tuple(jnp.asarray(a) for a in per_layer))
        (x, cache), _ = jax.lax.scan(body, (x, cache), xs, unroll=self.unroll)
        return x, cache


def stacked_modules(model: nnx.Module) -> dict[tuple, int]:
    """{path of each `ScannedBlocks` in `model`: its number of layers} (paths as in
    `nnx.to_flat_state`, e.g. ('backbone', 'h'))."""
    return {tuple(path): node.num_layers for path, node in nnx.iter_graph(model)
            if isinstance(node, ScannedBlocks)}


def is_stacked(path: Sequence[Any]) -> bool:
    """Does a parameter path -- NNX path parts or a `jax.tree_util` key path (optimiser states
    included) -- lead into a `ScannedBlocks`' stack, i.e. has the array a leading layer axis?"""
    return any(getattr(k, "key", getattr(k, "name", k)) == STACK for k in path)


__all__ = ["ScannedBlocks", "stacked_modules", "is_stacked", "REMAT_POLICIES", "STACK"]
