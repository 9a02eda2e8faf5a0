"""PyTorch distributed: data parallelism with DDP or FSDP2 under `torchrun`. The JAX counterpart
is `ppo_jax/parallel.py` (a device mesh and XLA's SPMD partitioner).

    torchrun --nproc-per-node 8 -m ppo_rlhf train --backend torch --distributed fsdp ...
    # Python, under torchrun:
    trainer = PPOTrainer(..., distributed="ddp")     # or "fsdp"; None = one process

One process per device: `torch.distributed` with NCCL on GPUs (rank r uses cuda:LOCAL_RANK) and
gloo on CPU, set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). The trainable models (policy, critic) are wrapped in
  * "ddp":  `DistributedDataParallel` -- every rank holds all weights; gradients are averaged
            with all-reduces overlapped with the backward pass;
  * "fsdp": FSDP2, `torch.distributed.fsdp.fully_shard` on every decoder layer and on the model
            -- weights, gradients and AdamW state are sharded across ranks (DTensors), a
            layer's weights are all-gathered when it runs; the reference and reward models are
            sharded the same way (forward only).

How N ranks compute exactly what one process computes with the same global batch (only the
order of floating-point sums differs; tests/test_parallel_torch.py):
  * prompts, their order and the minibatch permutations (`ppo_rlhf.runtime.seeds`) are the same on every
    rank; rank r owns rows [r B/N, (r + 1) B/N) of the batch (`local_rows`) and of every minibatch;
  * rollout: each rank generates, runs the forward passes and scores (host rewards included) its
    own rows only. Sampling draws each step's Gumbel noise for the WHOLE batch from the shared
    seed and uses its rows (`generator_rows`), so it samples the tokens one process would.
    The rollout is then all-gathered (`gather_rollout`): every rank holds the whole batch;
  * advantages (GAE; whitening needs whole-batch statistics) are computed on the whole batch by
    every rank -- cheap and identical;
  * update: each rank splits its rows of a minibatch into `grad_accum_steps` micro-batches; a
    micro-batch's loss is weighted by its share of the GLOBAL minibatch's tokens (sequences for
    seq-mean-token-mean), so the ranks' losses sum to the one-process loss. DDP and FSDP2
    AVERAGE gradients over ranks, so each rank's loss is multiplied by N (`scale_loss`);
  * stats: weighted sums all-reduced (max / min statistics by max / min); gradient clipping uses
    the global norm; whether a step is skipped (non-finite) is decided on those global values,
    so every rank steps or skips together.
Rank 0 alone writes metrics, checkpoint files and the progress bar; with FSDP2 the full tensors
are gathered for it first, so checkpoints have the single-process format and resume either way.

LoRA (`lora_rank > 0`): the models are wrapped as they are, frozen base weights and all. DDP
registers only the parameters that require grad (the adapters, a LoRA critic's head) -- the
frozen base is neither bucketed nor all-reduced, and every adapter takes part in every forward,
so no `find_unused_parameters` is needed; FSDP2 shards each unit's frozen and trained
parameters alike (per-parameter sharding: mixed requires_grad is fine) and reduce-scatters the
adapters' gradients only. The reference is the wrapped policy with its adapters switched off
(`adapters_disabled`); checkpoints hold the adapters and their AdamW state.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from ppo_rlhf.errors import UsageError
from ppo_rlhf.rollout import RolloutBatch
from ppo_rlhf.runtime.processes import Processes, check_data_parallel

STRATEGIES = ("ddp", "fsdp")


def under_torchrun() -> bool:
    """Is this process one of several started by torchrun (WORLD_SIZE > 1)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class SingleProcess(Processes):
    """One process, no wrapping: every method is the identity (the trainer without
    `distributed=`, unchanged)."""

    strategy: str | None = None

    @property
    def rank(self) -> int:
        return self.index

    def default_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def check_config(self, config: Any) -> None:
        check_data_parallel(config, self.count, f"--distributed {self.strategy} over {self.count} ranks")

    # -- models
    def wrap(self, trainable: Sequence[torch.nn.Module | None],
             frozen: Sequence[torch.nn.Module | None] = ()) -> None:
        """Prepare the models once they are on their device, before the optimiser exists."""

    def training_view(self, module: torch.nn.Module) -> Any:
        """What the loss calls for `module` (DDP: its wrapper)."""
        return module

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's backward: skip the gradient exchange unless `last`."""
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def generating(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Around generation with `module`."""
        return contextlib.nullcontext()

    # -- batches
    def local_rows(self, n: int) -> slice:
        """This rank's rows of a batch (or minibatch) of n rows."""
        per = n // self.count
        return slice(self.rank * per, (self.rank + 1) * per)

    def generator_rows(self, n: int) -> tuple[int, int] | None:
        """For `ppo_torch.generate(generator_rows=...)` on this rank's n rows: (its first row,
        the global number of rows); None on one process."""
        return None

    def gather_rollout(self, batch: RolloutBatch) -> RolloutBatch:
        return batch

    def reduce_stats(self, stats: Mapping[str, torch.Tensor], max_keys: Sequence[str],
                     min_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(stats)

    # -- checkpoints
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor (FSDP2: gathered from its shards; every rank must call)."""
        return t

    def shard_like(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`full` laid out like `like` (FSDP2: this rank's shard of it, as a DTensor)."""
        return full

    def full_model(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """`module` with whole weights, to save (FSDP2: a plain copy on the main rank, gathered
        from the shards -- every rank must call; None on the others)."""
        return module


class Distributed(SingleProcess):
    """One rank of a `torch.distributed` job; `strategy` "ddp" or "fsdp" (see the module
    docstring). The process group is created from torchrun's environment unless one exists;
    a process not started by torchrun makes a group of one (handy for debugging)."""

    def __init__(self, strategy: str, *, backend: str | None = None,
                 timeout: datetime.timedelta | None = None):
        if strategy not in STRATEGIES:
            raise UsageError(f"distributed={strategy!r}: choose one of {', '.join(STRATEGIES)}")
        self.strategy = strategy
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
            if "RANK" not in os.environ:  # not under torchrun: a group of one
                kw.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, **kw)
        self.count, self.index = dist.get_world_size(), dist.get_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.backend = dist.get_backend()
        self._ddp: dict[int, Any] = {}
        self._fsdp_roots: list[torch.nn.Module] = []
        self._skeletons: dict[int, torch.nn.Module] = {}

    def default_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    # -- Processes (the host loop's coordination)
    def barrier(self, name: str) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(bool(flag))], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def shared_token(self) -> str:
        box = [str(os.getpid())]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return torch.device(self.default_device())

    # -- models
    def wrap(self, trainable: Sequence[torch.nn.Module | None],
             frozen: Sequence[torch.nn.Module | None] = ()) -> None:
        trainable = _unique(trainable)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            for m in trainable:
                dev = next(m.parameters()).device
                self._ddp[id(m)] = DDP(m, device_ids=[dev] if dev.type == "cuda" else None,
                                       forward_sync_buffers=False)
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # FSDP2 warns when a module returns a view (the critic's values are a slice): an
        # in-place op on it would skip a hook. Nothing here modifies model outputs in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
        for m in trainable + [f for f in _unique(frozen) if f not in trainable]:
            self._skeletons[id(m)] = _skeleton(m)  # to rebuild a plain copy for saving
            layers = set(getattr(_hf_model(m), "_no_split_modules", None) or ())
            for sub in m.modules():  # one FSDP unit per decoder layer, then the rest
                if type(sub).__name__ in layers:
                    fully_shard(sub)
            # the root reshards after forward too (FSDP2 keeps it gathered by default): outside
            # a forward pass every registered parameter is then its sharded DTensor -- what the
            # optimiser, gradient clipping and checkpoints see (costs one all-gather of the
            # root's own weights between forward and backward)
            fully_shard(m, reshard_after_forward=True)
            if hasattr(m, "values"):  # called directly by the critic / reward code
                register_fsdp_forward_method(m, "values")
            if m in trainable:
                self._fsdp_roots.append(m)

    def training_view(self, module: torch.nn.Module) -> Any:
        wrapper = self._ddp.get(id(module))
        return module if wrapper is None else _DDPView(wrapper, module)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        if last:
            for m in self._fsdp_roots:
                m.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        for m in self._fsdp_roots:
            m.set_requires_gradient_sync(False)
        stack = contextlib.ExitStack()
        for w in self._ddp.values():
            stack.enter_context(w.no_sync())
        return stack

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # each rank's loss is its share of the global loss; DDP / FSDP2 average over ranks
        return loss * self.count

    @contextlib.contextmanager
    def generating(self, module: torch.nn.Module) -> Iterator[None]:
        """FSDP2: gather every layer's weights once (all ranks together) and keep them for the
        whole decode loop, so that no collective runs per token and a rank whose rows have all
        finished may stop early; reshard afterwards."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.unshard()
            u.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for u in units:
                u.reshard()
                u.set_reshard_after_forward(True, recurse=False)

    # -- batches
    def generator_rows(self, n: int) -> tuple[int, int] | None:
        return (self.rank * n, self.count * n)

    def gather_rollout(self, batch: RolloutBatch) -> RolloutBatch:
        parts: list[Any] = [None] * self.count
        dist.all_gather_object(parts, batch)
        return RolloutBatch.concatenate(parts)

    def reduce_stats(self, stats: Mapping[str, torch.Tensor], max_keys: Sequence[str],
                     min_keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Weighted-mean stats are summed over ranks (each rank's already carry its share of the
        global weight); max / min stats reduced by max / min (min as max of the negation)."""
        keys = list(stats)
        sign = torch.tensor([-1.0 if k in min_keys else 1.0 for k in keys], dtype=torch.float64)
        v = torch.stack([stats[k].detach().double().cpu() for k in keys])
        dev = self._comm_device()
        summed, extreme = v.clone().to(dev), (v * sign).to(dev)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(extreme, op=dist.ReduceOp.MAX)
        summed, extreme = summed.cpu(), (extreme.cpu() * sign)
        out = {}
        for i, k in enumerate(keys):
            val = extreme[i] if (k in max_keys or k in min_keys) else summed[i]
            out[k] = val.to(dtype=stats[k].dtype, device=stats[k].device)
        return out

    # -- checkpoints
    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if _is_dtensor(t) else t

    def shard_like(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not _is_dtensor(like):
            return full
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same full tensor (read from the same file): no communication
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh,
                                 like.placements, src_data_rank=None)

    def full_model(self, module: torch.nn.Module) -> torch.nn.Module | None:
        if not any(_is_dtensor(p) for p in module.parameters()):
            return module if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not self.is_main:
            return None
        plain = copy.deepcopy(self._skeletons[id(module)])  # parameters on "meta": no memory
        plain.load_state_dict({k: v.cpu() for k, v in full.items()}, assign=True)
        _retie(plain)
        return plain


class _DDPView:
    """What `ppo_torch.models` forward functions need from a model, routed through its DDP
    wrapper's forward (DDP synchronises gradients only for calls through it)."""

    def __init__(self, wrapper: Any, module: torch.nn.Module):
        self._wrapper, self._module = wrapper, module
        self.config = module.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapper(*args, **kwargs)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        from ppo_torch.models import ScalarHeadModel

        if isinstance(self._module, ScalarHeadModel):  # its forward is values()
            return self._wrapper(input_ids, attention_mask, positions=positions)
        return self._wrapper(input_ids, attention_mask, positions=positions, return_values=True)[1]


def _skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters are empty "meta" tensors (buffers copied, ties kept):
    what a plain copy is rebuilt from once full weights are gathered."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _retie(module: torch.nn.Module) -> None:
    """load_state_dict(assign=True) gives tied weights separate tensors: tie them again."""
    for m in module.modules():
        if hasattr(m, "tie_weights") and getattr(getattr(m, "config", None), "tie_word_embeddings", False):
            m.tie_weights()


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _hf_model(m: torch.nn.Module) -> Any:
    return getattr(getattr(m, "lm", m), "hf_model", None)


def _unique(modules: Sequence[torch.nn.Module | None]) -> list[torch.nn.Module]:
    out: list[torch.nn.Module] = []
    for m in modules:
        if m is not None and all(m is not o for o in out):
            out.append(m)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shutdown(*, exit_code: int | None = None) -> None:
    """Leave the process group (end of a torchrun job), if one was joined: a barrier (no rank tears
    down its gloo pairs while another may still use them), then destroy_process_group.

    With `exit_code`, then end this process at once with that status (`os._exit`, after flushing
    stdout, stderr and logging), skipping the interpreter's finalization: FSDP2's device mesh
    keeps the gloo process group referenced after destroy_process_group, so its worker threads
    (pt_gloo_runloop, gloo_tcp_loop) live on until finalization, and one that touches Python
    there aborts the rank ("terminate called without an active exception", exit -6: seen twice
    in the FSDP CLI test, after the run had finished and saved). The CLI's ranks exit this way;
    a caller with more to do after the job leaves `exit_code` out."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        import logging
        import sys

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(exit_code)


def setup(distributed: "str | SingleProcess | None") -> SingleProcess:
    """The trainer's `distributed=` argument -> its process-group handle: None -> one process;
    "ddp" / "fsdp" -> `Distributed` (joining torchrun's group); an instance passes through."""
    if distributed is None:
        return SingleProcess()
    if isinstance(distributed, SingleProcess):
        return distributed
    return Distributed(str(distributed))


__all__ = ["STRATEGIES", "SingleProcess", "Distributed", "setup", "shutdown", "under_torchrun"]
