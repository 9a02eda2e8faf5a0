"""The PPO workload both peers run, and the bookkeeping they share.

Pure Python + numpy: imported by `trl_ppo.py` (torch venv) and `tunix_ppo.py` (jax venv) alike, so
both programs see the same model sizes, the same prompt token ids, the same reward function and write
the same JSON schema. Our own harness (ppo_jax / ppo_torch) is meant to use the same numbers.

One PPO iteration = 16 prompts x 32 prompt tokens (random ids, no padding) -> 32 sampled response
tokens each (temperature 1.0, no early stop) -> policy/ref log-probs, values, score -> KL-shaped
rewards -> GAE -> 4 epochs x 1 minibatch (of 16) of policy+value updates, Adam(W) lr 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------
# Model sizes. GPT-2 layout: n_layer blocks of (LN, attn with biases, LN, 4x GELU MLP), learned
# positions, LM head tied to the token embedding.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int

    def gpt2_params(self) -> int:
        """Parameter count of GPT2LMHeadModel at this size (tied LM head, counted once)."""
        d, v, p, l_ = self.n_embd, self.vocab_size, self.n_positions, self.n_layer
        per_layer = 12 * d * d + 13 * d  # c_attn 3d^2+3d, c_proj d^2+d, fc 4d^2+4d, proj 4d^2+d, 2 LN 4d
        return v * d + p * d + l_ * per_layer + 2 * d


PRESETS = {
    # ~1.07M parameters (GPT2LMHeadModel, tied head): see ModelSpec.gpt2_params.
    "tiny1m": ModelSpec("tiny1m", n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=128),
    # GPT-2 small shape: 124.4M parameters.
    "gpt2s": ModelSpec("gpt2s", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    # The demo model (provisional sizes; override on the command line).
    "demo": ModelSpec("demo", n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int = 16  # prompts per iteration (= rollout batch)
    prompt_len: int = 32  # prompt tokens, random ids, no padding
    response_len: int = 32  # sampled tokens, fixed length (no EOS can be sampled)
    ppo_epochs: int = 4
    minibatches: int = 1  # minibatch size = batch / minibatches
    temperature: float = 1.0
    lr: float = 1e-5
    kl_coef: float = 0.05  # k1 estimator, per-token penalty in the reward
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    seed: int = 0

    @property
    def tokens_per_iteration(self) -> int:
        return self.batch * (self.prompt_len + self.response_len)


def add_cli_args(parser) -> None:
    """CLI arguments shared by both peers."""
    parser.add_argument("--model", default="tiny1m", choices=sorted(PRESETS))
    parser.add_argument("--n-layer", type=int, help="override the preset's n_layer")
    parser.add_argument("--n-embd", type=int, help="override the preset's n_embd")
    parser.add_argument("--n-head", type=int, help="override the preset's n_head")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocab size")
    parser.add_argument("--n-positions", type=int, help="override the preset's n_positions")
    parser.add_argument("--iterations", type=int, default=5, help="timed PPO iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations first")
    parser.add_argument("--quick", action="store_true", help="3 timed iterations, 1 warm-up")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON result here (default: stdout only)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads (torch.set_num_threads / XLA CPU intra-op); default: the library's own",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="first wait up to S seconds for other processes to leave the CPU (shared machine)",
    )


def threads_from_argv(argv=None) -> int | None:
    """--threads N, read before the framework is imported (XLA reads its flags at import)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


def spec_from_args(args) -> ModelSpec:
    base = PRESETS[args.model]
    over = {
        k: getattr(args, k)
        for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")
        if getattr(args, k) is not None
    }
    spec = dataclasses.replace(base, **over)
    if spec.n_embd % spec.n_head:
        raise SystemExit(f"n_embd {spec.n_embd} is not a multiple of n_head {spec.n_head}")
    return spec


def workload_from_args(args) -> Workload:
    if args.quick:
        args.iterations, args.warmup = 3, 1
    wl = Workload(
        batch=args.batch,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        ppo_epochs=args.epochs,
        minibatches=args.minibatches,
        seed=args.seed,
    )
    if wl.batch % wl.minibatches:
        raise SystemExit("batch must be a multiple of minibatches")
    return wl


def prompt_ids(spec: ModelSpec, wl: Workload, n_batches: int) -> np.ndarray:
    """[n_batches, batch, prompt_len] int32 token ids, uniform over the vocabulary, seeded.

    Identical in both peers (numpy's PCG64 with the workload seed)."""
    rng = np.random.default_rng(wl.seed)
    return rng.integers(0, spec.vocab_size, size=(n_batches, wl.batch, wl.prompt_len), dtype=np.int64).astype(
        np.int32
    )


def reward_fn(response_ids) -> int:
    """The fixed deterministic (integer) reward: #even token ids in the response - len/2.

    Used by Tunix (whose 0.1.7 PPO reward tensor is int32, so rewards must be integers) and by TRL
    with `--reward fn`."""
    ids = [int(t) for t in response_ids]
    return sum(1 for t in ids if t % 2 == 0) - len(ids) // 2


# ----------------------------------------------------------------------------------------------
# Timing and reporting
# ----------------------------------------------------------------------------------------------


def _cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU-seconds from /proc/stat, this process's CPU-seconds, wall time)."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (vals[0] + vals[1] + vals[2] + vals[5] + vals[6]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def wait_quiet(max_wait_s: float, max_other_cores: float = 0.3) -> float:
    """Wait (up to max_wait_s) until other processes use < max_other_cores of CPU over 2 s.

    This machine is shared (2 cores); a benchmark next to a test run measures the test run.
    Returns the other processes' CPU use (in cores) at the last check."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        b0, o0, t0 = _cpu_snapshot()
        time.sleep(2.0)
        b1, o1, t1 = _cpu_snapshot()
        others = max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0)
        if others < max_other_cores or time.perf_counter() >= deadline:
            global _CPU_AT_START, LOAD_AT_START  # measure contention from here on
            _CPU_AT_START = _cpu_snapshot()
            LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]
            return others
        print(f"[wait_quiet] other processes use {others:.2f} cores; waiting", file=sys.stderr)


LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]
_CPU_AT_START = _cpu_snapshot()


def contention() -> dict[str, float]:
    """CPU used by OTHER processes while this one ran (whole run, from /proc/stat minus our rusage)."""
    b0, o0, t0 = _CPU_AT_START
    b1, o1, t1 = _cpu_snapshot()
    wall = t1 - t0
    others = max(0.0, (b1 - b0) - (o1 - o0))
    return {
        "wall_s": round(wall, 2),
        "own_cpu_s": round(o1 - o0, 2),
        "others_cpu_s": round(others, 2),
        "others_avg_cores": round(others / wall, 3) if wall > 0 else None,
    }


class PhaseTimer:
    """Accumulates wall time and process CPU time per named phase within the current iteration.

    CPU time (time.process_time: all threads of this process) is reported next to wall time
    because this machine is shared: other processes stretch wall time, much less CPU time."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.current_cpu: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.history_cpu: list[dict[str, float]] = []
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds
        if cpu_seconds is not None:
            self.current_cpu[name] = self.current_cpu.get(name, 0.0) + cpu_seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def end_iteration(self) -> dict[str, float]:
        done, self.current = self.current, {}
        self.history.append(done)
        self.history_cpu.append(self.current_cpu)
        self.current_cpu = {}
        return done


class Stopwatch:
    """`with Stopwatch() as sw: ...` then sw.wall, sw.cpu (process CPU seconds, all threads)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        return False


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def median(xs):
    return statistics.median(xs) if xs else None


def build_result(
    *,
    program: str,
    spec: ModelSpec,
    wl: Workload,
    config_extra: dict[str, Any],
    iteration_times: list[float],
    warmup_times: list[float],
    timer: PhaseTimer,
    n_warmup: int,
    versions: dict[str, str],
    notes: list[str],
    extra: dict[str, Any] | None = None,
    iteration_cpu_times: list[float] | None = None,
) -> dict[str, Any]:
    timed_phases = timer.history[n_warmup:]
    timed_cpu = timer.history_cpu[n_warmup:]
    names = sorted({k for h in timed_phases for k in h})
    phases = {}
    for k in names:
        vals = [h.get(k, 0.0) for h in timed_phases]
        phases[k] = {"median_s": median(vals), "all_s": vals}
        cpu = [h[k] for h in timed_cpu if k in h]
        if cpu:
            phases[k]["median_cpu_s"] = median(cpu)
    it = median(iteration_times)
    if it is not None:
        covered = median([sum(h.values()) for h in timed_phases])
        phases["other"] = {
            "median_s": max(0.0, it - covered),
            "note": "iteration time not inside any instrumented phase (framework overhead, logging, ...)",
        }
    result = {
        "program": program,
        "model": spec.name,
        "config": {
            "model": dataclasses.asdict(spec),
            "gpt2_params": spec.gpt2_params(),
            "workload": dataclasses.asdict(wl),
            "tokens_per_iteration": wl.tokens_per_iteration,
            **config_extra,
        },
        "iteration_s": it,
        "iteration_s_all": iteration_times,
        "iteration_cpu_s": median(iteration_cpu_times[n_warmup:]) if iteration_cpu_times else None,
        "iteration_cpu_s_all": iteration_cpu_times[n_warmup:] if iteration_cpu_times else None,
        "first_iteration_s": warmup_times[0] if warmup_times else None,
        "warmup_iterations_s": warmup_times,
        "tokens_per_s": (wl.tokens_per_iteration / it) if it else None,
        "tokens_per_s_definition": "batch * (prompt_len + response_len) / median iteration_s "
        "(prompt and response tokens of one PPO iteration, counted once)",
        "phases": phases,
        "peak_rss_mb": peak_rss_mb(),
        "versions": versions,
        "machine": {"load_avg_1_5_15_at_start": LOAD_AT_START, **machine_info()},
        "contention": contention(),
        "notes": notes,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        result.update(extra)
    return result


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=False)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    summary = {
        k: result.get(k)
        for k in ("program", "model", "iteration_s", "iteration_cpu_s", "first_iteration_s", "tokens_per_s",
                  "peak_rss_mb")
    }
    summary["others_avg_cores"] = result.get("contention", {}).get("others_avg_cores")
    summary["phases"] = {k: round(v["median_s"], 4) for k, v in result["phases"].items()}
    print(json.dumps(summary, indent=1))
