"""Sharded JAX: a device mesh with named axes, the sharding rules of the trainer's arrays, and
multi-host start-up. The PyTorch counterpart is `ppo_torch/parallel.py` (DDP / FSDP2).

    from ppo_jax.parallel import initialize_distributed, make_mesh
    initialize_distributed()                  # several hosts: jax.distributed.initialize()
    mesh = make_mesh("data=2,fsdp=4")         # a jax.sharding.Mesh over all (global) devices
    trainer = PPOTrainer(..., mesh=mesh)      # or mesh="data=2,fsdp=4"; None = one device

The engine is XLA's SPMD partitioner (GSPMD): the trainer's jitted programs are the same as on
one device; we only say where the inputs live (`jax.device_put` with a `NamedSharding`) and pin
a few intermediate results (`jax.lax.with_sharding_constraint`), and jit propagates the rest and
inserts the collectives (all-gathers of fsdp-sharded weights where a layer runs, reduce-scatters
or all-reduces of gradients, all-reduces of batch statistics such as advantage whitening).

Sharding rules (axes "data", "fsdp", "tensor"; see `ppo_rlhf.runtime.processes` for what each means):
  * parameters (policy, critic, reference, reward model) and the AdamW state (its moments have
    the parameters' shapes): the largest dimension divisible by the fsdp size is split over
    `fsdp`; with a `tensor` axis, the largest remaining dimension divisible by its size is split
    over `tensor`; replicated over `data`. Scalars (the step count) and arrays without a
    divisible dimension are replicated. The leading LAYER axis of the blocks' stacked
    parameters (`ppo_jax.models.stack`; their AdamW moments too) is never split: every device
    holds its fsdp / tensor slice of every layer, so the scan over layers reads layer i locally
    and all-gathers only that layer's slices where it runs (FSDP's per-layer gather). Split over
    fsdp, the layer axis would make XLA gather the whole stack before the scan.
    LoRA adapters (`ppo_jax.models.lora`: lora_a [L, in, rank], lora_b [L, rank, out], and
    their AdamW moments) follow the same rule with their RANK axis never split either, so
    each is split over fsdp along its in / out axis, as its kernel's weights are, and is not
    split over tensor (no other dimension is left). The rank (4-64) is tiny and
    is the contraction of x A B: split, each device would hold a partial product and every
    adapted projection of every layer would need an all-reduce of a [batch, length, out]
    activation, for a weight of a few kB per device; it is also often smaller than, or not
    divisible by, the device count (and split over tensor, A laid out (None, fsdp, tensor),
    its gradients came out wrong on XLA:CPU: docs/distributed.md, "Known limits").
  * rollout batch, minibatches and micro-batches (inside the update's lax.scan), Gumbel noise:
    rows (dim 0) over ("data", "fsdp"); replicated over `tensor`.
  * KV cache [layers, B, kv_heads, slots, head_dim] during generation: rows (dim 1) over
    ("data", "fsdp"); the layer axis replicated, as the parameters'.
  * minibatch row indices: replicated.
The update keeps parameters and optimiser state on these shardings from one step to the next
(pinned in the scan carry), so nothing recompiles after the first iteration.

Numerics: only the order of some reductions changes (a sum over rows becomes per-device partial
sums plus an all-reduce), so a sharded run agrees with the single-device run to float32 rounding
-- sampling too: `jax.random` with the (default) partitionable threefry draws the same numbers
however the array is sharded.

Multi-host (a TPU slice, several GPU nodes): every host runs the same command;
`initialize_distributed()` calls `jax.distributed.initialize()` when the environment says this
process is one of several (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, or a
SLURM / Open MPI job of several tasks) or when asked to (`force=True`, `--multihost` on the CLI:
on Cloud TPU VMs JAX finds its peers itself). Every host reads the same prompts and computes the
same host-side values; each feeds only its own devices' shards. Process 0 writes metrics and
the progress bar; checkpoints are written by all (Orbax writes each host's shards) and finished
by process 0. Host-side rewards see the whole batch on every host.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ppo_jax.models.lora import adapter_rank_axis
from ppo_jax.models.stack import is_stacked
from ppo_rlhf.errors import UsageError
from ppo_rlhf.runtime.processes import MESH_AXES, SINGLE_PROCESS, MeshSpec, Processes, check_data_parallel, parse_mesh
from ppo_rlhf.runtime.seeds import dropout_seed

BATCH_AXES = ("data", "fsdp")
"""The mesh axes the batch rows are split over."""


# ---- multi-host start-up ---------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _in_multiprocess_job() -> bool:
    """Does the environment say this process is one of several of a JAX job?"""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if (_env_int("SLURM_STEP_NUM_TASKS") or 1) > 1:  # inside `srun` with several tasks
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(force: bool | None = None) -> bool:
    """Join a multi-host job through `jax.distributed.initialize()`; call it before anything
    else touches JAX devices. force=None: only when the environment names a multi-process job
    -- JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, `srun` with several tasks, Open MPI (mpirun) with several ranks, or a
    TPU slice listing several workers in TPU_WORKER_HOSTNAMES; force=True: always (Cloud TPU
    VMs, where JAX discovers the slice's hosts by itself). Returns whether JAX is now running
    multi-process (True also when it already was)."""
    if jax.distributed.is_initialized():
        return True
    if not (_in_multiprocess_job() if force is None else force):
        return False
    kw = {}
    if _env_int("JAX_NUM_PROCESSES") is not None:
        kw["num_processes"] = _env_int("JAX_NUM_PROCESSES")
    if _env_int("JAX_PROCESS_ID") is not None:
        kw["process_id"] = _env_int("JAX_PROCESS_ID")
    jax.distributed.initialize(**kw)
    return True


class JaxProcesses(Processes):
    """The processes of a multi-host JAX job (`ppo_rlhf.runtime.processes.Processes`)."""

    def __init__(self) -> None:
        self.count, self.index = jax.process_count(), jax.process_index()

    def barrier(self, name: str) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

    def any(self, flag: bool) -> bool:
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))

    def shared_token(self) -> str:
        from jax.experimental import multihost_utils

        return str(int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid()))))


# ---- the mesh --------------------------------------------------------------------------------------
def make_mesh(spec: "str | dict | MeshSpec | Mesh", *, devices: Any = None) -> Mesh:
    """A `jax.sharding.Mesh` with axes ("data", "fsdp", "tensor") (sizes from `spec`, e.g.
    "data=2,fsdp=4"; an axis left out has size 1) over `devices` (default: every device of every
    process, `jax.devices()`), ordered by `jax.make_mesh` for the hardware's topology. The axes
    are `AxisType.Auto`: XLA propagates shardings. UsageError naming the device count when the
    sizes' product differs from it. A Mesh passes through unchanged (its axis names checked)."""
    if isinstance(spec, Mesh):
        unknown = set(spec.axis_names) - set(MESH_AXES)
        if unknown or not set(BATCH_AXES) <= set(spec.axis_names):
            raise UsageError(f"mesh axes {spec.axis_names}: the trainer needs axes named "
                             f"{', '.join(MESH_AXES)} ('tensor' optional)")
        return spec
    spec = parse_mesh(spec)
    devices = jax.devices() if devices is None else list(devices)
    if spec.size != len(devices):
        kind = f"{devices[0].platform.upper()} " if devices else ""
        procs = f" across {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise UsageError(
            f"mesh {spec} needs data x fsdp x tensor = {' x '.join(map(str, spec.shape))} = "
            f"{spec.size} devices, but there are {len(devices)} {kind}devices{procs}: choose "
            f"axis sizes whose product is {len(devices)}")
    return jax.make_mesh(spec.shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def mesh_spec(mesh: Mesh) -> MeshSpec:
    return MeshSpec(**{a: int(mesh.shape[a]) for a in MESH_AXES if a in mesh.shape})


# ---- the rules -------------------------------------------------------------------------------------
def param_spec(shape: tuple[int, ...], mesh: Mesh, *, stacked: bool = False,
               rank_axis: int | None = None) -> P:
    """PartitionSpec of a parameter (or optimiser-state array) of `shape` (see the module
    docstring): the largest dimension divisible by the fsdp size over "fsdp" (the first of equal
    ones), then the largest remaining one divisible by the tensor size over "tensor".
    stacked=True: dim 0 is the layer axis of scanned blocks, never split; rank_axis: a LoRA
    adapter's rank axis (a negative index), never split."""
    spec: list[Any] = [None] * len(shape)
    kept = set() if rank_axis is None else {rank_axis % len(shape)}
    for axis in ("fsdp", "tensor"):
        n = int(mesh.shape.get(axis, 1))
        if n == 1:
            continue
        free = [d for d in range(int(stacked), len(shape))
                if spec[d] is None and d not in kept and shape[d] % n == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = axis
    return P(*spec)


def param_spec_at(path: Any, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`param_spec` of the array at `path` (NNX path parts or a `jax.tree_util` key path,
    optimiser states included): through a `ScannedBlocks` stack (`ppo_jax.models.stack.is_stacked`)
    its layer axis whole, a LoRA adapter (`ppo_jax.models.lora.adapter_rank_axis`) its rank
    axis whole."""
    return param_spec(tuple(shape), mesh, stacked=is_stacked(path), rank_axis=adapter_rank_axis(path))


def param_specs(tree: Any, mesh: Mesh) -> Any:
    """`param_spec_at` of every array of a parameter / optimiser-state tree (a tree of
    PartitionSpecs of the same structure)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_spec_at(path, np.shape(x), mesh), tree)


def batch_spec(ndim: int) -> P:
    """PartitionSpec of a batch-major array: rows over ("data", "fsdp")."""
    return P(BATCH_AXES, *([None] * (ndim - 1))) if ndim else P()


def _host_value(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)


UNSAFE_TENSOR_AXIS_ENV = "PPO_RLHF_UNSAFE_TENSOR_AXIS"


def check_tensor_training(mesh: Any) -> None:
    """UsageError when `mesh` has a `tensor` axis > 1 and ${UNSAFE_TENSOR_AXIS_ENV} is not "1":
    on this jax / XLA (observed on XLA:CPU, jax 0.10.2, float64 too) a scan over layers whose
    stacked weights are laid out (None, fsdp, tensor) -- what the rule gives Llama's / Qwen's
    square projections -- gets WRONG gradients while its loss is right (docs/distributed.md,
    "Known limits"; a pure-JAX two-layer repro is in tests/test_parallel_jax.py). Training
    refuses it rather than train silently wrong; planning (`ppo-rlhf plan --mesh ...,tensor=N`)
    never trains and is not affected. Set the variable to train anyway (the tests do, on GPT-2,
    whose layouts are exact)."""
    if mesh is None or dict(mesh.shape).get("tensor", 1) <= 1:
        return
    if os.environ.get(UNSAFE_TENSOR_AXIS_ENV) == "1":
        return
    raise UsageError(f"mesh tensor={dict(mesh.shape)['tensor']}: the tensor axis gives wrong gradients "
                     f"on this jax/XLA for Llama/Qwen-shaped weights (docs/distributed.md, Known limits): "
                     f"use data and fsdp axes, or set {UNSAFE_TENSOR_AXIS_ENV}=1 to train anyway")


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """x (numpy or jax) as a global array with `sharding`. One process: `jax.device_put`;
    several: every process holds the same full value and contributes its devices' shards. An
    abstract array (`jax.ShapeDtypeStruct`: a planned trainer, `ppo_jax.abstract`) stays
    abstract and gets `sharding`. (Arrays two roles share stay shared through `Placement.placer`.)"""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global: reshard
        return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    value = _host_value(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _asarray(x: Any) -> Any:
    return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)


def fetch(x: Any) -> Any:
    """A (tree of) jax array(s) as numpy; on several hosts, arrays sharded across them are
    all-gathered first (every process gets the whole value)."""
    def one(a: Any) -> Any:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return jax.device_get(a)
    return jax.tree.map(one, x)


class Placement:
    """Where the trainer's arrays live, and the only place `ppo_jax/ppo.py` learns about meshes.

    mesh=None: one device; `batch` is `jnp.asarray`, `fetch` is `jax.device_get` and every other
    method is the identity -- the single-device trainer, unchanged, with no overhead. With a
    mesh: the rules of the module docstring."""

    def __init__(self, mesh: Mesh | None = None):
        self.mesh = mesh
        multi = mesh is not None and jax.process_count() > 1
        self.processes: Processes = JaxProcesses() if multi else SINGLE_PROCESS
        self.spec = None if mesh is None else mesh_spec(mesh)

    @property
    def data_parallel(self) -> int:
        return 1 if self.spec is None else self.spec.data_parallel

    def check_config(self, config: Any) -> None:
        """UsageError unless the config's (micro-)batches split over data x fsdp."""
        if self.spec is not None:
            check_data_parallel(config, self.data_parallel, f"mesh {self.spec}")

    def check_training(self) -> None:
        """Before a trainer's first update: `check_tensor_training` of this mesh."""
        check_tensor_training(self.mesh)

    def _named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # -- host -> devices
    def params(self, tree: Any) -> Any:
        """Parameters / optimiser state onto the mesh by the parameter rule."""
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x, spec: _put(x, self._named(spec)), tree,
                            param_specs(tree, self.mesh))

    def placer(self) -> Callable[[Any], Any]:
        """`params` with a memory, for building one trainer: an array that several trees share
        (a LoRA critic's base weights are the reward model's arrays) is placed once and stays
        shared. Keep it only while building: it holds the arrays it was given."""
        if self.mesh is None:
            return self.params
        memo: dict[int, tuple[Any, Any]] = {}

        def put(x: Any, spec: Any) -> Any:
            if id(x) not in memo:
                memo[id(x)] = (x, _put(x, self._named(spec)))  # x kept: its id stays unique
            return memo[id(x)][1]

        return lambda tree: jax.tree.map(put, tree, param_specs(tree, self.mesh))

    def batch(self, tree: Any) -> Any:
        """Batch-major arrays (numpy or jax) onto the mesh, rows over data x fsdp."""
        if self.mesh is None:
            return jax.tree.map(_asarray, tree)
        return jax.tree.map(lambda x: _put(x, self._named(batch_spec(len(np.shape(x))))), tree)

    def replicated(self, x: Any) -> Any:
        if self.mesh is None:
            return _asarray(x)
        return _put(x, self._named(P()))

    def dropout_key(self, seed: int, step: int | None) -> tuple[Any]:
        """(the LoRA dropout key of a supervised trainer's step `step`, replicated: a pure
        function of (seed, step); abstract for step None, for `programs`, which compile without
        data,)."""
        if step is None:
            return (self.replicated(jax.eval_shape(lambda: jax.random.key(0))),)
        return (self.replicated(jax.random.key(dropout_seed(seed, step))),)

    def loaders(self, kit: Any) -> Any:
        """`kit` (a `ppo_rlhf.runtime.roles.ModelKit`) whose `load_pretrained` and
        `load_scalar_model` load a checkpoint dir straight onto this mesh's shards (their
        `mesh=`: no whole host copy); one device: `kit` itself."""
        if self.mesh is None:
            return kit
        import dataclasses

        return dataclasses.replace(kit, load_pretrained=functools.partial(kit.load_pretrained, mesh=self.mesh),
                                   load_scalar_model=functools.partial(kit.load_scalar_model, mesh=self.mesh))

    # -- inside jit: pin shardings that propagation alone would leave to chance
    def constrain_params(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x, spec: jax.lax.with_sharding_constraint(x, self._named(spec)),
                            tree, param_specs(tree, self.mesh))

    def constrain_batch(self, tree: Any) -> Any:
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, self._named(batch_spec(x.ndim))), tree)

    @property
    def kv_cache(self) -> NamedSharding | None:
        """Sharding of each [layers, B, kv_heads, slots, head_dim] KV-cache array (rows over
        data x fsdp, layers replicated; None: one device)."""
        return None if self.mesh is None else self._named(P(None, *batch_spec(4)))

    # -- devices -> host
    def fetch(self, tree: Any) -> Any:
        return jax.device_get(tree) if self.mesh is None else fetch(tree)

    def gathered(self, module: Any) -> Any:
        """An NNX module whose arrays this host can read (to save it). Several hosts: its state
        all-gathered into host memory -- a collective, every process must call it."""
        if self.processes.count == 1:
            return module
        from flax import nnx

        graphdef, state = nnx.split(module)
        return nnx.merge(graphdef, fetch(state))


def builds_on_host(init: Callable) -> Callable:
    """Decorator for a trainer's `__init__(..., mesh=...)`: with a mesh, models built during
    construction (a critic made from the policy, a fresh head, a model given already loaded) live
    in host memory (the CPU backend as JAX's default device) and are only then placed, sharded,
    on the mesh -- instead of whole onto the first accelerator, which could not hold a model that
    needs FSDP. (Checkpoint dirs are loaded straight onto their shards: `Placement.loaders`.)
    Without a mesh, or where the CPU is the only backend: nothing changes."""
    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, mesh: Any = None, **kwargs: Any) -> None:
        try:
            cpu = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # no CPU backend
            cpu = None
        if mesh is None or cpu is None or jax.default_backend() == "cpu":
            return init(self, *args, mesh=mesh, **kwargs)
        with jax.default_device(cpu):
            return init(self, *args, mesh=mesh, **kwargs)
    return wrapper


def placement(mesh: "Mesh | MeshSpec | str | dict | None") -> Placement:
    """A `Placement` for the trainer's `mesh=` argument (None, a Mesh or a spec for make_mesh)."""
    return Placement(None if mesh is None else make_mesh(mesh))


__all__ = ["initialize_distributed", "make_mesh", "mesh_spec", "param_spec", "param_spec_at", "param_specs",
           "batch_spec", "fetch", "Placement", "placement", "builds_on_host", "JaxProcesses", "BATCH_AXES"]
