"""Scaling beyond one device, the backend-neutral part: mesh specs and process coordination.

Two engines do the actual work, each the standard one of its framework:

* JAX (`ppo_jax/parallel.py`): one program over a `jax.sharding.Mesh` with named axes, partitioned
  by XLA's SPMD partitioner (GSPMD); several hosts join through `jax.distributed.initialize`.
* PyTorch (`ppo_torch/parallel.py`): one process per GPU under `torchrun`, `torch.distributed`
  (NCCL on GPU, gloo on CPU), the models wrapped in DDP or FSDP2 (`fully_shard`).

This module holds what both need and what the CLI checks before importing either backend:

    spec = parse_mesh("data=2,fsdp=4")      # MeshSpec(data=2, fsdp=4, tensor=1)
    spec.size, spec.data_parallel            # 8 devices, batch split 8 ways
    check_data_parallel(config, 8, "mesh data=2,fsdp=4")   # batch sizes divide? clear error if not

Mesh axes (the order is the device order: the LAST axis gets neighbouring devices, so put the
axis with the most traffic last -- `tensor`, then `fsdp`; `data` may span hosts or slices):

    data    pure data parallelism: every `data` group holds a full copy of the weights and
            optimiser state and works on its own rows of the batch; gradients are averaged
            across groups (one all-reduce per optimiser step).
    fsdp    fully sharded data parallelism (ZeRO-3): weights, gradients and optimiser state are
            split across the `fsdp` devices (each holds 1/fsdp of every parameter) AND the batch
            rows are split across them; a layer's weights are all-gathered when it runs.
    tensor  (optional) tensor parallelism: each parameter is split a second time, along another
            dimension, over `tensor`; those devices work on the same rows.

Rollout batches, minibatches and the KV cache are split along the batch dimension over
data x fsdp ("the data-parallel size"), so every micro-batch must divide evenly by it.

`Processes` is how the host loop (`ppo_rlhf.runtime.loop`) coordinates several
processes: only the main one writes metrics, checkpoints and the progress bar; a stop request
(SIGTERM) is agreed on by all; checkpoints are written collectively. One process: trivial.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ppo_rlhf.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")
"""Axis names, outermost first (see the module docstring for what each means)."""


@dataclass(frozen=True)
class MeshSpec:
    """The size of each mesh axis (1 = not split along it)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @property
    def size(self) -> int:
        """Devices the mesh needs."""
        return self.data * self.fsdp * self.tensor

    @property
    def data_parallel(self) -> int:
        """Ways the batch rows are split (data x fsdp)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        parts = [f"{a}={getattr(self, a)}" for a in MESH_AXES if getattr(self, a) != 1]
        return ",".join(parts) or "data=1"


def tpu_device_present() -> bool:
    """Does this machine have a TPU (a TPU VM's device files: /dev/accel*, /dev/vfio/<n>)? Where
    not, libtpu need not look for one: the CLI keeps JAX off the TPU platform and `ppo-rlhf plan`
    tells libtpu there is no TPU host (compiling for a named topology needs no TPU)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def gpu_device_present() -> bool:
    """Does this machine have an NVIDIA GPU (its driver's device files: /dev/nvidia0, ...)? Where
    not, JAX need not start its CUDA plugin (installed for `ppo-rlhf plan --topology h100`,
    which compiles for a GPU without one)."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def parse_mesh(spec: "str | Mapping[str, int] | MeshSpec") -> MeshSpec:
    """"data=2,fsdp=4" (or {"data": 2, "fsdp": 4}, or a MeshSpec) -> MeshSpec. Axes left out
    have size 1. UsageError naming the problem for anything else (unknown axis, repeated axis,
    a size that is not a positive integer)."""
    if isinstance(spec, MeshSpec):
        return spec
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise UsageError(f"mesh {spec!r}: {part!r} is not AXIS=SIZE "
                                 f"(e.g. data=2,fsdp=4; axes: {', '.join(MESH_AXES)})")
            items.append((name.strip(), value.strip()))
        if not items:
            raise UsageError(f"mesh {spec!r} is empty: give AXIS=SIZE pairs, e.g. data=2,fsdp=4")
    else:
        raise UsageError(f"mesh must be a string like 'data=2,fsdp=4', a dict or a MeshSpec, "
                         f"got {type(spec).__name__}")
    sizes: dict[str, int] = {}
    for name, value in items:
        if name not in MESH_AXES:
            raise UsageError(f"mesh {spec!r}: unknown axis {name!r}; the axes are "
                             f"{', '.join(MESH_AXES)}")
        if name in sizes:
            raise UsageError(f"mesh {spec!r}: axis {name!r} is given twice")
        if isinstance(value, str) and re.fullmatch(r"\d+", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"mesh {spec!r}: the size of axis {name!r} must be an integer "
                             f">= 1, got {value!r}")
        sizes[name] = value
    return MeshSpec(**sizes)


def check_data_parallel(config: Any, ways: int, where: str) -> None:
    """UsageError unless every micro-batch of `config` (a PPOConfig; an RMConfig / SFTConfig: its
    batch) splits evenly into `ways` data-parallel parts. The rollout batch is split `ways` ways
    for generation (batch_size prompts, so that each part holds whole groups of num_generations
    responses), and each
    optimiser step's micro-batch (rollout_size / (num_minibatches * grad_accum_steps) rows) is
    split `ways` ways for the update, so the micro-batch size must be a multiple of `ways`."""
    if ways <= 1:
        return
    if config.batch_size % ways:
        raise UsageError(f"{where}: batch_size={config.batch_size} cannot be split over "
                         f"{ways} data-parallel workers; make it a multiple of {ways}")
    if not hasattr(config, "microbatch_size"):  # RM / SFT: one batch per step
        return
    if config.microbatch_size % ways:
        raise UsageError(
            f"{where}: the micro-batch of rollout_size={config.rollout_size} / (num_minibatches="
            f"{config.num_minibatches} x grad_accum_steps={config.grad_accum_steps}) = "
            f"{config.microbatch_size} rows cannot be split over {ways} data-parallel workers; "
            f"make rollout_size / (num_minibatches x grad_accum_steps) a multiple of {ways}")


class Processes:
    """Coordination of the processes of one training job, as the host loop needs it. This
    base class is the single-process case; `ppo_jax.parallel` (jax.distributed) and
    `ppo_torch.parallel` (torch.distributed) subclass it."""

    count: int = 1
    index: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes metrics, checkpoints and the progress bar (process 0)."""
        return self.index == 0

    def barrier(self, name: str) -> None:
        """Wait until every process gets here."""

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (e.g. one of them got SIGTERM)."""
        return bool(flag)

    def shared_token(self) -> str:
        """A string that is the same on every process and differs between runs (the main
        process's pid): names the temporary directory a checkpoint is written into."""
        return str(os.getpid())


SINGLE_PROCESS = Processes()

__all__ = ["MESH_AXES", "MeshSpec", "parse_mesh", "check_data_parallel", "Processes",
           "SINGLE_PROCESS"]
