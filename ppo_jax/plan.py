"""Plan a run before renting its devices: every program of one PPO iteration (or of one step of
reward-model training or SFT) compiled for a named TPU topology from this machine (XLA's TPU
compiler runs anywhere libtpu is installed), and the bytes per chip that XLA's buffer assignment
decided.

    report = plan_ppo("qwen-0.5b/", "qwen-0.5b/", PPOConfig(batch_size=64), topology="v5e:2x2")
    report.fits, report.peak_bytes, report.programs[0].temp_bytes
    plan_rm("qwen-0.5b/", RMConfig(batch_size=64), topology="v5e:2x2")    # reward model
    plan_sft("qwen-0.5b/", SFTConfig(batch_size=64), topology="v5e:2x2")  # SFT

How: the trainer is built abstractly -- models from config.json alone (`load_pretrained(...,
abstract=True)`: every parameter a `jax.ShapeDtypeStruct`), the same `__init__` as a real run
(`PPOTrainer`, `RewardModelTrainer`, `SFTTrainer`), placed by the same sharding rules
(`ppo_jax.parallel`) on a mesh of compile-only devices
(`jax.experimental.topologies.get_topology_desc`) -- and each program of the trainer's
`programs()` is lowered on abstract arguments and compiled (`plan_trainer`). Nothing is allocated.

Per program, per chip: argument, temporary, output and aliased (donated) bytes as XLA reports
them (`Compiled.memory_analysis()`); `resident_bytes` = everything on the chip while the program
runs: the whole resident state (every role's weights and the optimiser state, read by the
program or not) + its other arguments (the batch) + its outputs that alias nothing; `peak_bytes`
= resident + temporaries. The iteration's peak is the largest program peak; it fits when that is
at most the chip's HBM. FLOPs are XLA's `cost_analysis()` (a loop body counted once: a lower
bound for scans and the decode loop).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import jax
from jax._src import config as jax_config  # a context manager for one option (no public one)

from ppo_jax.abstract import tree_nbytes
from ppo_jax.gpu_targets import (
    device_memory_bytes,
    gpu_topology_devices,
    is_gpu_topology,
    mem_fraction,
    parse_gpu_topology,
)
from ppo_rlhf.errors import UsageError
from ppo_rlhf.runtime.processes import tpu_device_present

GiB = 1024 ** 3

# HBM per chip of the TPU generations libtpu names (Cloud TPU docs: v4 32 GiB, v5e 16 GiB,
# v5p 95 GiB, v6e 32 GiB).
TPU_HBM = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:2x4, v5p:2x2x1, v6e:2x4, v4:2x2x1, h100, h100:8, or cpu"


@dataclass
class ProgramPlan:
    name: str
    argument_bytes: int = 0
    temp_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    resident_bytes: int = 0
    peak_bytes: int = 0
    flops: float = 0.0
    compile_s: float = 0.0
    collective_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes per chip produced by each kind of collective in the compiled program's text
    (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute); an op inside a loop
    (the scan over layers, the decode loop, the update's scan) is counted ONCE, not per trip."""
    largest_values: list[dict[str, Any]] = field(default_factory=list)
    """The largest values the program computes (`largest_values`), per chip."""
    error: str | None = None
    """XLA's refusal (e.g. RESOURCE_EXHAUSTED: more temporaries than HBM); the program does not fit."""


@dataclass
class Plan:
    topology: str
    chips: int
    hbm_bytes_per_chip: int
    mesh: str
    programs: list[ProgramPlan] = field(default_factory=list)
    resident_state_bytes: int = 0
    peak_bytes: int = 0
    fits: bool = False
    compile_s: float = 0.0
    batch_size: int = 0
    largest_state: list[dict[str, Any]] = field(default_factory=list)
    max_batch_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.max_batch_size is None:
            d.pop("max_batch_size")
        return d


# ---- devices -------------------------------------------------------------------------------------
def topology_devices(topology: str) -> tuple[list[Any], int]:
    """(devices, HBM bytes per device) of a topology name: a libtpu topology ("v5e:2x2",
    "v5p:2x2x1", ...: compile-only devices), a GPU ("h100", "h100:8": compile-only devices from
    jax's CUDA plugin; the bytes JAX's allocator may use, `ppo_jax.gpu_targets`) or "cpu" (this
    machine's CPU devices; "HBM" = its physical memory). UsageError for a name libtpu does not
    accept."""
    if topology == "cpu":
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return jax.devices("cpu"), int(mem)
    if is_gpu_topology(topology):  # "h100", "h100:8": XLA's GPU compiler, no GPU needed
        return gpu_topology_devices(topology)
    gen = topology.split(":", 1)[0].lower()
    if gen not in TPU_HBM or ":" not in topology:
        raise UsageError(f"unknown topology {topology!r}: use a TPU generation and shape as libtpu "
                         f"names them ({TOPOLOGY_EXAMPLES})")
    if not tpu_device_present():
        # no TPU here: tell libtpu so, or it prints a page of errors while looking for one
        # (the topology, not these, decides what is compiled for)
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_HOST_BOUNDS", "1,1,1")):
            os.environ.setdefault(k, v)
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"topology {topology!r}: {msg} (needs libtpu: pip install "
                         f"'ppo-rlhf[tpu]')") from None
    devices = list(desc.devices)
    chips = 1
    for d in re.findall(r"\d+", topology.split(":", 1)[1]):
        chips *= int(d)
    # libtpu may show a chip as several devices (v4:2x2x1 is 4 chips, 8 devices): the chip's
    # HBM is shared by its devices
    return devices, TPU_HBM[gen] * chips // max(len(devices), chips)


# ---- compiling ------------------------------------------------------------------------------------
def compile_program(name: str, fn: Callable, args: tuple, state_args: tuple,
                    resident_state_bytes: int) -> ProgramPlan:
    """Compile `fn` on abstract `args` and read XLA's memory analysis (see the module docstring)."""
    t0 = time.perf_counter()
    try:
        # not through the persistent compilation cache: a compile-only device's executable cannot
        # be loaded back from it (XLA: "PjRtCompiler must be constructed with a Client"), and a
        # plan's programs never run
        with jax_config.enable_compilation_cache(False):
            compiled = fn.lower(*args).compile()
    except Exception as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        line = next((ln for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln or "exceeds" in ln), text)
        p = ProgramPlan(name, compile_s=time.perf_counter() - t0, error=line.strip()[:300])
        # "... HLO temporaries (56.08G) exceeds available HBM (15.75G)": XLA's own figure (GiB)
        need = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", line)
        if need:
            p.temp_bytes = int(float(need.group(1)) * 1024 ** ("KMGT".index(need.group(2)) + 1))
        p.resident_bytes = resident_state_bytes
        p.peak_bytes = p.resident_bytes + p.temp_bytes
        return p
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    p = ProgramPlan(name, argument_bytes=int(m.argument_size_in_bytes),
                    temp_bytes=int(m.temp_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                    alias_bytes=int(m.alias_size_in_bytes), flops=float(cost.get("flops", 0.0)),
                    compile_s=compile_s)
    text = compiled.as_text()
    p.collective_bytes, p.largest_values = collective_bytes(text), largest_values(text)
    batch_args = max(p.argument_bytes - tree_nbytes(state_args, unique=False), 0)  # as XLA counts
    p.resident_bytes = resident_state_bytes + batch_args + max(p.output_bytes - p.alias_bytes, 0)
    p.peak_bytes = p.resident_bytes + p.temp_bytes
    return p


_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-done)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Result bytes of each collective kind in an HLO module's text (SPMD-partitioned: per chip).
    Synchronous ops and the `-done` halves of asynchronous ones count (a `-start` returns its
    input too)."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or f"{m.group(2)}-start(" in line:
            continue
        n = 0
        for dtype, dims in _ARRAY.findall(m.group(1)):
            size = _BYTES[dtype]
            for d in filter(None, dims.split(",")):
                size *= int(d)
            n += size
        out[m.group(2)] = out.get(m.group(2), 0) + n
    return out


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def largest_values(hlo_text: str, n: int = 6) -> list[dict[str, Any]]:
    """The `n` largest array values an HLO module computes (per chip): shape, dtype, the HLO op
    and the JAX operation it came from (its metadata). Not all of them are live at once -- XLA's
    buffer assignment decides that -- but the temporaries are made of these."""
    rows = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(2) not in _BYTES or m.group(4) in ("parameter", "get-tuple-element",
                                                              "bitcast", "constant"):
            continue
        dims = [int(d) for d in m.group(3).split(",") if d]
        size = _BYTES[m.group(2)]
        for d in dims:
            size *= d
        src = _OP_NAME.search(line)
        rows.append({"bytes": size, "shape": dims, "dtype": m.group(2), "op": m.group(4),
                     "from": src.group(1)[-120:] if src else ""})
    rows.sort(key=lambda r: -r["bytes"])
    out, seen = [], set()
    for r in rows:
        key = (tuple(r["shape"]), r["dtype"], r["from"])
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == n:
            break
    return out


def _largest_state(state: Any, n: int = 6) -> list[dict[str, Any]]:
    """The `n` largest arrays of the resident state, per chip: path, global shape, dtype, bytes."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if hasattr(x, "shape"):
            rows.append({"what": jax.tree_util.keystr(path), "shape": list(x.shape),
                         "dtype": str(x.dtype), "bytes_per_chip": tree_nbytes(x)})
    return sorted(rows, key=lambda r: -r["bytes_per_chip"])[:n]


def _mesh(mesh: str | None, devices: list[Any]) -> Any:
    """The mesh of `--mesh` over `devices` (default: fsdp over all of them)."""
    from ppo_jax.parallel import make_mesh

    return make_mesh(mesh or f"fsdp={len(devices)}", devices=devices)


def build_ppo_trainer(model: str, reward_model: str | None, config: Any, *, devices: list[Any],
                      mesh: str | None, dtype: str = "float32"):
    """The abstract PPOTrainer: models from config.json alone, on a mesh of `devices`."""
    from ppo_jax.models import load_pretrained, load_scalar_model
    from ppo_jax.ppo import PPOTrainer
    from ppo_rlhf import hf_checkpoint as hfc

    # each model built with its role's options, as the trainer would load it (LoRA: the policy's)
    policy = load_pretrained(model, dtype, options=config.model_options("policy"), abstract=True)
    frozen = config.model_options("reference").frozen()  # the reward model: never adapters
    hf = hfc.read_config(model)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    reward = (load_scalar_model(reward_model, dtype, options=frozen, abstract=True) if reward_model
              else (lambda prompts, responses: [0.0] * len(responses)))
    return PPOTrainer(policy, reward, config=config, mesh=_mesh(mesh, devices), dtype=dtype,
                      eos_token_id=None if eos is None else int(eos),
                      pad_token_id=int(hf.get("pad_token_id") or 0))


def build_rm_trainer(model: str, config: Any, *, devices: list[Any], mesh: str | None,
                     dtype: str = "float32"):
    """The abstract RewardModelTrainer: a scalar-head model from config.json alone (a causal LM's
    config serves: the trunk + a score head), on a mesh of `devices`."""
    from ppo_jax.reward_model import RewardModelTrainer, init_reward_model

    rm = init_reward_model(model, seed=config.seed, dtype=dtype,
                           options=config.model_options(config.LORA_ROLES[0]), abstract=True)
    return RewardModelTrainer(rm, config, mesh=_mesh(mesh, devices))


def build_sft_trainer(model: str, config: Any, *, devices: list[Any], mesh: str | None,
                      dtype: str = "float32"):
    """The abstract SFTTrainer: a causal LM from config.json alone, on a mesh of `devices`."""
    from ppo_jax.models import load_pretrained
    from ppo_jax.sft import SFTTrainer

    lm = load_pretrained(model, dtype, options=config.model_options(config.LORA_ROLES[0]), abstract=True)
    return SFTTrainer(lm, config, mesh=_mesh(mesh, devices))


def plan_trainer(trainer: Any, *, topology: str, chips: int, hbm: int, batch_size: int,
                 progress: Callable[[str], None] | None = None) -> Plan:
    """Compile every program of `trainer.programs()` (any trainer built on abstract models: PPO,
    RM, SFT) and build its Plan: per-program bytes, the peak, whether it fits `hbm`."""
    state = trainer.resident_state()
    resident = tree_nbytes(state)
    plan = Plan(topology=topology, chips=chips, hbm_bytes_per_chip=hbm,
                mesh=str(trainer.parallel.spec), resident_state_bytes=resident,
                batch_size=batch_size)
    for name, (fn, args, state_args) in trainer.programs().items():
        if progress:
            progress(f"compiling {name} (batch_size={batch_size}) for {topology}")
        p = compile_program(name, fn, args, state_args, resident)
        plan.programs.append(p)
        plan.compile_s += p.compile_s
    plan.peak_bytes = max(p.peak_bytes for p in plan.programs)
    plan.fits = all(p.error is None for p in plan.programs) and plan.peak_bytes <= hbm
    plan.largest_state = _largest_state(state)
    return plan


def _plan_built(build: Callable[..., Any], config: Any, topology: str, mesh: str | None,
                progress: Callable[[str], None] | None, **build_kw: Any) -> Plan:
    """Build a trainer abstractly on `topology`'s devices (`build`: one of the build_*_trainer
    functions) and plan it (`plan_trainer`)."""
    devices, hbm = topology_devices(topology)
    trainer = build(config=config, devices=devices, mesh=mesh, **build_kw)
    return plan_trainer(trainer, topology=topology, chips=len(devices), hbm=hbm,
                        batch_size=config.batch_size, progress=progress)


def plan_ppo(model: str, reward_model: str | None, config: Any, *, topology: str,
             mesh: str | None = None, dtype: str = "float32",
             progress: Callable[[str], None] | None = None) -> Plan:
    """Compile every program of one PPO iteration for `topology` (see the module docstring)."""
    return _plan_built(build_ppo_trainer, config, topology, mesh, progress, model=model,
                       reward_model=reward_model, dtype=dtype)


def plan_rm(model: str, config: Any, *, topology: str, mesh: str | None = None,
            dtype: str = "float32", progress: Callable[[str], None] | None = None) -> Plan:
    """Compile reward-model training's step and scoring forward for `topology`."""
    return _plan_built(build_rm_trainer, config, topology, mesh, progress, model=model, dtype=dtype)


def plan_sft(model: str, config: Any, *, topology: str, mesh: str | None = None,
             dtype: str = "float32", progress: Callable[[str], None] | None = None) -> Plan:
    """Compile SFT's step and evaluation forward for `topology`."""
    return _plan_built(build_sft_trainer, config, topology, mesh, progress, model=model, dtype=dtype)


def data_parallel_ways(mesh: str | None, devices: list[Any]) -> int:
    """How many ways the batch is split on `devices` with `--mesh` (default: fsdp over all)."""
    from ppo_jax.parallel import mesh_spec

    return mesh_spec(_mesh(mesh, devices)).data_parallel


def max_batch_size(run: Callable[[int], Plan], unit: int, start: int,
                   progress: Callable[[str], None] | None = None) -> tuple[int, Plan | None]:
    """The largest batch size (a multiple of `unit`) whose plan fits: doubling from `start` until
    one does not fit, then bisection. (0, None) when even `unit` does not fit."""
    fits: dict[int, Plan] = {}

    def ok(b: int) -> bool:
        plan = run(b)
        if progress:
            progress(f"batch_size={b}: peak {plan.peak_bytes / GiB:.2f} GiB per chip -> "
                     f"{'fits' if plan.fits else 'does not fit'}")
        if plan.fits:
            fits[b] = plan
        return plan.fits

    k = max(start // unit, 1)
    if ok(k * unit):
        lo, hi = k, None
        while hi is None:
            if ok(2 * lo * unit):
                lo *= 2
            else:
                hi = 2 * lo
    else:
        lo, hi = 0, k
        while hi - lo > 1 and lo == 0:
            mid = max(hi // 2, 1)
            if mid == hi:
                break
            if ok(mid * unit):
                lo = mid
            else:
                hi = mid
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid * unit):
            lo = mid
        else:
            hi = mid
    return lo * unit, fits.get(lo * unit)


# ---- advice -----------------------------------------------------------------------------------------
def levers(config: Any) -> list[str]:
    """The memory switches of `config` (a PPOConfig, RMConfig or SFTConfig: the fields it has)
    not yet used, as --set arguments."""
    out = []
    if config.remat != "full":
        out.append("remat=full (keep only each layer's input for the backward)")
    if hasattr(config, "logprob_chunk") and not config.logprob_chunk:
        out.append("logprob_chunk=64 (never the whole [batch, response, vocab] float32 logits)")
    if config.compute_dtype is None:
        out.append("compute_dtype=bfloat16 (bf16 matmuls and activations)")
    if hasattr(config, "frozen_dtype") and config.frozen_dtype is None:
        out.append("frozen_dtype=bfloat16 (reference and reward model in bf16)")
    if hasattr(config, "grad_accum_steps") and config.grad_accum_steps == 1:
        out.append("grad_accum_steps=N (smaller micro-batches in the update)")
    if not hasattr(config, "grad_accum_steps"):
        out.append("a smaller batch_size (one batch per step: no gradient accumulation)")
    out.append("a larger topology or mesh (more fsdp chips)")
    return out


def format_plan(plan: Plan, config: Any) -> str:
    unit, div = ("GiB", GiB) if plan.peak_bytes >= GiB else ("MiB", 1024 ** 2)
    g = lambda b: f"{b / div:8.3f}"
    lines = [f"topology {plan.topology}: {plan.chips} chips, {plan.hbm_bytes_per_chip / GiB:.2f} GiB "
             f"per chip; mesh {plan.mesh}; batch_size {plan.batch_size}",
             *([f"(a GPU's share JAX's allocator may use: XLA_PYTHON_CLIENT_MEM_FRACTION={mem_fraction():g} "
                f"of {device_memory_bytes(parse_gpu_topology(plan.topology)[0]) / GiB:.2f} GiB)"]
               if is_gpu_topology(plan.topology) else []),
             f"resident state (all weights + optimiser state) per chip: {plan.resident_state_bytes / div:.3f} {unit}",
             f"{unit} per chip       argument     temp   output    alias resident     peak  fits  compile s",
             ]
    for p in plan.programs:
        if p.error:
            lines.append(f"{p.name:<16}  XLA refused it: {p.error}")
            continue
        lines.append(f"{p.name:<16} {g(p.argument_bytes)} {g(p.temp_bytes)} {g(p.output_bytes)} "
                     f"{g(p.alias_bytes)} {g(p.resident_bytes)} {g(p.peak_bytes)}  "
                     f"{'yes' if p.peak_bytes <= plan.hbm_bytes_per_chip else 'NO ':<4} {p.compile_s:9.1f}")
    lines.append(f"iteration peak {plan.peak_bytes / div:.3f} {unit} of {plan.hbm_bytes_per_chip / GiB:.2f} GiB "
                 f"per chip (compiled in {plan.compile_s:.1f} s)")
    if any(p.collective_bytes for p in plan.programs):
        lines.append("collectives per chip (each loop body counted once):")
        for p in plan.programs:
            if p.collective_bytes:
                lines.append(f"  {p.name:<16} " + ", ".join(
                    f"{k} {v / div:.3f} {unit}" for k, v in sorted(p.collective_bytes.items())))
    if plan.max_batch_size is not None:
        lines.append(f"largest batch_size that fits: {plan.max_batch_size}")
    if plan.fits:
        lines.append("verdict: FITS")
    else:
        lines.append("verdict: DOES NOT FIT")
        lines.append("largest resident arrays (per chip):")
        for r in plan.largest_state:
            lines.append(f"  {r['bytes_per_chip'] / GiB:.3f} GiB  {r['what']} {r['dtype']}{r['shape']}")
        worst = max(plan.programs, key=lambda p: p.peak_bytes)
        if worst.largest_values:
            lines.append(f"largest values computed by {worst.name} (per chip; not all live at once):")
            for r in worst.largest_values:
                shape = ",".join(map(str, r["shape"]))
                lines.append(f"  {r['bytes'] / GiB:.3f} GiB  {r['dtype']}[{shape}] {r['op']}  {r['from']}")
        lines.append("switches that would help: " + "; ".join(levers(config)))
    return "\n".join(lines)


__all__ = ["Plan", "ProgramPlan", "TPU_HBM", "topology_devices", "plan_trainer", "plan_ppo", "plan_rm", "plan_sft",
           "build_ppo_trainer", "build_rm_trainer", "build_sft_trainer", "data_parallel_ways",
           "max_batch_size", "format_plan", "levers", "compile_program"]
