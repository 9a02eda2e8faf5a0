"""Where ppo_jax's PPO iteration spends its time, per phase and per XLA:CPU kernel kind.

    python -m benchmarks.kernels --model gpt2s --iterations 1    # the gpt2s update, kernel by kernel
    python -m benchmarks.kernels --model tiny1m --scan-unroll    # the same with the layer scan unrolled

The benchmarks' PPO workload (`benchmarks/peers/workload.py`, as `benchmarks.ours` runs it) in
ppo_jax, one warm-up iteration (compilation), then `--iterations` iterations under
`jax.profiler.trace`. Each trainer phase (`ppo_rlhf.runtime.metrics.phase_timer`: generation,
forward, update, ...) is marked in the trace, and its wall time is split among the XLA kernels
running in it: a kernel runs from its start until XLA's thunk executor marks it done (for a dot
XLA hands to Eigen, which completes asynchronously, that is long after the kernel's own trace
event ends); an instant when several run (XLA's threads run independent kernels side by side)
goes to them in equal parts, and a loop (`while`) is charged only when none of its body's
kernels runs. The parts add up to the phase's wall time, with what is left as "no kernel
running": the thunk runtime handing work from kernel to kernel, host work, waits. Kernels are
grouped by kind, the HLO name without its `.N` suffix: `ynn_fusion` = a dot XLA:CPU hands to
YNNPACK, `dot` = one it runs with Eigen (the weight gradients x^T dy), `dynamic-slice_*` /
`*dynamic-update-slice*` = the layer scan reading a layer's slice of the stacked weights and
activations or writing its gradient, `copy_bitcast_fusion` / `transpose_copy_fusion` =
transposes, `multiply_add_fusion` = AdamW, ... CPU only: a GPU trace puts its kernels on device
planes this module does not read.

Output: a markdown table per phase on stdout and, with `--out`, the JSON (all phases, all kinds)
and the table next to it (`.md`).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import workload as W  # noqa: E402

from ppo_rlhf.config import REMATS  # noqa: E402

MARK = "ppo-phase:"  # prefix of the trace annotation around each trainer phase


def marked_phases():
    """Mark every `phase_timer` block in the profiler trace (`jax.profiler.TraceAnnotation`)."""
    import jax

    from benchmarks.ours import around_each_phase

    return around_each_phase(lambda name: jax.profiler.TraceAnnotation(MARK + name))


def kind_of(name: str) -> str:
    """An HLO instruction's kind: its name without the `.N` XLA numbers it with."""
    return re.sub(r"(\.\d+)+$", "", name)


CONTAINERS = ("while", "cond", "conditional", "call")
"""Kernel kinds that run other kernels (a loop's body, a branch): charged only for the time none
of the kernels inside them runs."""


def kernel_spans(lines: Iterable[Iterable[Any]]) -> list[tuple[int, int, str]]:
    """(start ns, end ns, HLO name) of every XLA kernel in the trace lines of XLA's threads. A
    kernel is an event naming an HLO instruction (stat `hlo_op`); it ends when the thunk
    executor marks it done (an `end: NAME` event whose `_c` stat is the kernel's `_p`), which
    for an asynchronous thunk (a dot XLA hands to Eigen) is long after the event itself ends."""
    spans, done = {}, {}
    for line in lines:
        for e in line:
            st = dict(e.stats)
            if "hlo_op" in st:
                spans[st.get("_p", id(e))] = [int(e.start_ns), int(e.start_ns + e.duration_ns), e.name]
            elif e.name.startswith("end: ") and "_c" in st:
                done[st["_c"]] = int(e.start_ns + e.duration_ns)
    for key, span in spans.items():
        span[1] = max(span[1], done.get(key, span[1]))
    return [tuple(s) for s in spans.values()]


def wall_shares(spans: list[tuple[int, int, str]], start: int, end: int) -> tuple[dict[str, float], int]:
    """Split the window [start, end) among the kernels running in it: each instant goes in equal
    parts to the kernels running then (a container kind -- a loop -- only when nothing inside it
    runs: then to the innermost), or to no kernel. Returns ({kind: ns}, ns with no kernel); the
    parts add up to end - start."""
    edges = []
    for s, e, name in spans:
        s, e = max(s, start), min(e, end)
        if s < e:
            edges += [(s, 1, name), (e, -1, name)]
    edges.sort(key=lambda x: (x[0], x[1]))
    shares: dict[str, float] = defaultdict(float)
    active: dict[str, int] = {}  # running kernels (name -> start, for the innermost container)
    t, idle = start, 0
    for when, step, name in edges + [(end, 0, "")]:
        if when > t:
            leaves = [n for n in active if kind_of(n) not in CONTAINERS]
            if leaves:
                for n in leaves:
                    shares[kind_of(n)] += (when - t) / len(leaves)
            elif active:
                shares[kind_of(max(active, key=active.get))] += when - t
            else:
                idle += when - t
            t = when
        if step > 0:
            active[name] = when
        elif step < 0:
            active.pop(name, None)
    return dict(shares), idle


def attribute(xplane: str) -> dict[str, dict[str, Any]]:
    """Per phase: its wall time (s, summed over its occurrences), the part of it no kernel ran
    (`no_kernel_s`) and, per kernel kind, its share of the wall time (`s`, see `wall_shares`)
    and the number of its kernels that started in the phase."""
    # the reader behind jax.profiler's ProfileData
    from jax._src.lib import _profile_data

    data = _profile_data.ProfileData.from_file(xplane)
    windows: list[tuple[int, int, str]] = []
    xla_lines = []
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                windows += [(int(e.start_ns), int(e.start_ns + e.duration_ns), e.name[len(MARK):])
                            for e in line.events if e.name.startswith(MARK)]
            else:
                xla_lines.append(list(line.events))
    spans = sorted(kernel_spans(xla_lines))
    out: dict[str, dict[str, Any]] = {}
    for start, end, phase in sorted(windows):
        v = out.setdefault(phase, {"wall_s": 0.0, "no_kernel_s": 0.0,
                                   "kernels": defaultdict(lambda: {"s": 0.0, "calls": 0})})
        inside = [sp for sp in spans if sp[0] < end and sp[1] > start]
        shares, idle = wall_shares(inside, start, end)
        v["wall_s"] += (end - start) / 1e9
        v["no_kernel_s"] += idle / 1e9
        for kind, ns in shares.items():
            v["kernels"][kind]["s"] += ns / 1e9
        for s, _, name in inside:
            if start <= s < end:
                v["kernels"][kind_of(name)]["calls"] += 1
    for v in out.values():
        v["kernels"] = dict(sorted(v["kernels"].items(), key=lambda kv: -kv[1]["s"]))
    return out


def table(phases: dict[str, dict[str, Any]], top: int) -> str:
    lines = []
    for phase, v in phases.items():
        wall = v["wall_s"]
        ks = v["kernels"]
        idle = v["no_kernel_s"]
        lines += [(f"### {phase}: {wall:.3f} s wall, no kernel running {idle:.3f} s "
                   f"({100 * idle / wall:.0f}%)"), "",
                  "| kernel kind | s | % of phase | calls |", "|---|---|---|---|"]
        for kind, k in list(ks.items())[:top]:
            lines.append(f"| {kind} | {k['s']:.3f} | {100 * k['s'] / wall:.1f}% | {k['calls']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "ppo-rlhf-bench"))
    W.add_cli_args(p)
    p.add_argument("--scan-unroll", action="store_true", help="PPOConfig.scan_unroll")
    p.add_argument("--remat", default="none", choices=REMATS, help="PPOConfig.remat")
    p.add_argument("--phases", default="time/update_s",
                   help="comma-separated phases to print (all: 'all'); the JSON has them all")
    p.add_argument("--top", type=int, default=15, help="kernel kinds per phase in the table")
    p.add_argument("--trace-dir", help="keep the trace here (default: a temporary dir)")
    args = p.parse_args(argv)
    from benchmarks import compile_every_program
    from benchmarks.ours import build_trainer, make_checkpoints

    compile_every_program()
    spec, wl = W.spec_from_args(args), W.workload_from_args(args)
    policy_dir, rm_dir = make_checkpoints(spec, Path(args.cache_dir))
    import jax
    import numpy as np

    trainer, versions = build_trainer("jax", spec, wl, policy_dir, rm_dir, scan_unroll=args.scan_unroll,
                                      remat=args.remat)
    prompts = W.prompt_ids(spec, wl, args.warmup + args.iterations)
    mask = np.ones(prompts.shape[1:], np.int32)
    for i in range(args.warmup):
        trainer.step(i, query_ids=prompts[i], query_mask=mask)
    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = args.trace_dir or tmp
        with marked_phases(), jax.profiler.trace(trace_dir):
            for i in range(args.warmup, args.warmup + args.iterations):
                trainer.step(i, query_ids=prompts[i], query_mask=mask)
        files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
        if not files:
            raise SystemExit(f"no trace written under {trace_dir}")
        phases = attribute(files[-1])
    wanted = list(phases) if args.phases == "all" else args.phases.split(",")
    missing = [ph for ph in wanted if ph not in phases]
    if missing:
        raise SystemExit(f"no phase {missing} in the trace; phases: {', '.join(phases)}")
    head = (f"ppo_jax, {spec.name}, {args.iterations} iteration(s), scan_unroll={args.scan_unroll}, "
            f"remat={args.remat}\n\n")
    md = head + table({ph: phases[ph] for ph in wanted}, args.top)
    print(md)
    result = {"model": spec.name, "iterations": args.iterations, "scan_unroll": trainer.config.scan_unroll,
              "remat": trainer.config.remat,
              "versions": versions, "machine": W.machine_info(), "phases": phases}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(md)
    return result


if __name__ == "__main__":
    main()
