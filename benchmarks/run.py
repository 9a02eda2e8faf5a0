"""Benchmark harness: the same PPO workload in ppo_jax, ppo_torch (eager and torch.compile), TRL
and Tunix, per phase; a JSON file, a markdown table and a PNG plot.

    python -m benchmarks.run --quick --out benchmarks/results/quick.json     # < 2 min on 2 CPUs
    python -m benchmarks.run                                                  # full CPU suite
    python -m benchmarks.run --models gpt2s --programs jax,torch --iterations 2

Every program runs in its own subprocess (its own peak RSS, no shared caches); the peers run in
their own virtual environments (`benchmarks/peers/setup_trl.sh`, `setup_tunix.sh`) and are
skipped with a note when those are absent. The machine's float32 matmul peak is measured in the
same run (`benchmarks/peak.py`) and each phase's achieved FLOP/s is reported against it (on a GPU:
against the card's bf16 peak, and decode bytes against the memory-bandwidth roofline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
import workload as W  # noqa: E402

from benchmarks import flops as F  # noqa: E402
from ppo_rlhf.config import REMATS  # noqa: E402

OURS = ("jax", "torch", "torch-compile")
PEERS = {"trl": HERE / "peers" / ".venv-trl" / "bin" / "python",
         "tunix": HERE / "peers" / ".venv-tunix" / "bin" / "python"}
PEER_SCRIPT = {"trl": HERE / "peers" / "trl_ppo.py", "tunix": HERE / "peers" / "tunix_ppo.py"}
ALL_PROGRAMS = OURS + tuple(PEERS)
# GPU peaks for MFU / roofline (dense bf16 tensor-core FLOP/s, HBM bytes/s)
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def run_program(program: str, model: str, args: argparse.Namespace, out_json: Path) -> dict:
    common = ["--model", model, "--iterations", str(args.iterations), "--warmup", str(args.warmup),
              "--out", str(out_json)]
    if program in OURS:
        cmd = [sys.executable, "-m", "benchmarks.ours", "--program", program, *common]
        if args.scan_unroll:
            cmd += ["--scan-unroll"]
        if args.remat != "none":
            cmd += ["--remat", args.remat]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
    else:
        py = PEERS[program]
        if not py.exists():
            return {"program": program, "model": model, "skipped":
                    f"{py.parent.parent.name} not set up (run benchmarks/peers/setup_{program}.sh)"}
        cmd = [str(py), str(PEER_SCRIPT[program]), *common]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out_json.exists():
        return {"program": program, "model": model,
                "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result = json.loads(out_json.read_text())
    result["wall_s_subprocess"] = time.perf_counter() - t0
    return result


def measure_peak() -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peak"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-1000:]}


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def annotate(result: dict, peak_flops: float, gpu: str | None) -> None:
    """Achieved FLOP/s per phase and its fraction of the peak (and decode bandwidth on GPU)."""
    if "phases" not in result:
        return
    spec = W.ModelSpec(**result["config"]["model"])
    wl = W.Workload(**result["config"]["workload"])
    fl = F.iteration_flops(spec, wl)
    for phase, f in fl.items():
        if phase in result["phases"] and result["phases"][phase].get("median_s"):
            s = result["phases"][phase]["median_s"]
            result["phases"][phase]["flops"] = f
            result["phases"][phase]["achieved_gflops"] = f / s / 1e9
            result["phases"][phase]["fraction_of_peak"] = f / s / peak_flops
    if result.get("iteration_s"):
        result["achieved_gflops_iteration"] = fl["total"] / result["iteration_s"] / 1e9
        result["fraction_of_peak_iteration"] = fl["total"] / result["iteration_s"] / peak_flops
    if gpu and result["phases"].get("generation", {}).get("median_s"):
        bw = next((v[1] for k, v in GPU_PEAKS.items() if k in gpu), None)
        steps = wl.response_len
        moved = sum(F.decode_bytes_per_step(spec, wl.batch, wl.prompt_len + t, 2) for t in range(steps))
        result["decode_bytes"] = moved
        if bw:
            result["decode_fraction_of_bandwidth"] = moved / result["phases"]["generation"]["median_s"] / bw


def table(results: list[dict], peak: dict, machine: dict) -> str:
    lines = [f"Machine: {machine.get('cpu_model')} ({machine.get('usable_cores')} cores)"
             + (f", GPU: {machine['gpu']}" if machine.get("gpu") else "")
             + f"; measured float32 matmul peak {peak.get('peak_gflops', float('nan')):.1f} GFLOP/s.", ""]
    models = sorted({r["model"] for r in results}, key=lambda m: list(W.PRESETS).index(m) if m in W.PRESETS else 99)
    phases = ["generation", "forward", "advantages", "update"]
    header = ("| model | program | iteration s | vs ppo_jax | tokens/s | first iter s | compiles (warm-up/timed) | "
              + " | ".join(f"{p} s" for p in phases) + " | update % of peak | peak RSS MB |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for m in models:
        rows = [r for r in results if r["model"] == m]
        base = next((r.get("iteration_s") for r in rows if r.get("program") == "ppo_jax"), None)
        for r in rows:
            if "iteration_s" not in r or r.get("iteration_s") is None:
                lines.append(f"| {m} | {r['program']} | {r.get('skipped') or 'error: ' + r.get('error', '?')[:80]} |")
                continue
            ph = r.get("phases", {})

            def sec(p):
                v = ph.get(p, {}).get("median_s")
                return "-" if v is None else f"{v:.3f}"

            upd = ph.get("update", {}).get("fraction_of_peak")
            comp = r.get("compilations", {})
            ratio = f"{r['iteration_s'] / base:.1f}x" if base else "-"
            lines.append(
                f"| {m} | {r['program']} | {r['iteration_s']:.3f} | {ratio} | {r['tokens_per_s']:.0f} | "
                f"{(r.get('first_iteration_s') or 0):.1f} | "
                f"{comp.get('warmup', '-')}/{comp.get('timed', '-')} | "
                + " | ".join(sec(p) for p in phases)
                + f" | {'-' if upd is None else f'{100 * upd:.0f}%'} | {r.get('peak_rss_mb', 0):.0f} |")
    lines += ["", "`vs ppo_jax`: iteration time divided by ppo_jax's (higher = slower than ppo_jax). "
              "Peers name their phases differently; their per-phase numbers are in the JSON."]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("iteration_s")]
    models = sorted({r["model"] for r in ok})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in ok if r["model"] == m]
        names = [r["program"] for r in rows]
        bottom = [0.0] * len(rows)
        phase_names = sorted({p for r in rows for p in r.get("phases", {})})
        for p in phase_names:
            vals = [r["phases"].get(p, {}).get("median_s") or 0.0 for r in rows]
            ax.bar(names, vals, bottom=bottom, label=p)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{m}: seconds per PPO iteration")
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="demo + tiny1m, ppo_jax + ppo_torch, 2 timed iterations (< 2 min on 2 CPUs)")
    p.add_argument("--models", default="demo,tiny1m", help="comma-separated: " + ",".join(W.PRESETS))
    p.add_argument("--programs", default=",".join(ALL_PROGRAMS))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per program run")
    p.add_argument("--out", help="JSON file (default: benchmarks/results/<timestamp>.json)")
    p.add_argument("--cache-dir", help="where our programs keep the random-weight checkpoints "
                                       "(default: a ppo-rlhf-bench dir in the system temp dir)")
    p.add_argument("--scan-unroll", action="store_true",
                   help="our programs with PPOConfig.scan_unroll=True (JAX: the layer scan unrolled)")
    p.add_argument("--remat", default="none", choices=REMATS,
                   help="our programs with this PPOConfig.remat (activation checkpointing in the update)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.programs, args.iterations, args.warmup = "demo,tiny1m", "jax,torch", 2, 1
    models = [m for m in args.models.split(",") if m]
    programs = [m for m in args.programs.split(",") if m]
    for m in models:
        if m not in W.PRESETS:
            p.error(f"unknown model {m!r}: choose from {', '.join(W.PRESETS)}")
    for prog in programs:
        if prog not in ALL_PROGRAMS:
            p.error(f"unknown program {prog!r}: choose from {', '.join(ALL_PROGRAMS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else HERE / "results" / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**W.machine_info(), "gpu": gpu_name()}
    peak = measure_peak()
    gpu = machine["gpu"]
    peak_flops = next((v[0] for k, v in GPU_PEAKS.items() if gpu and k in gpu), None) or \
        peak.get("peak_gflops", float("nan")) * 1e9
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            for prog in programs:
                print(f"[bench] {m} / {prog} ...", file=sys.stderr, flush=True)
                r = run_program(prog, m, args, Path(tmp) / f"{m}-{prog}.json")
                annotate(r, peak_flops, gpu)
                results.append(r)
                if r.get("iteration_s"):
                    print(f"[bench]   iteration {r['iteration_s']:.3f}s, {r['tokens_per_s']:.0f} tokens/s",
                          file=sys.stderr)
                else:
                    print(f"[bench]   {r.get('skipped') or r.get('error', '')[:300]}", file=sys.stderr)
    summary = {"machine": machine, "peak": peak, "peak_flops_used": peak_flops,
               "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *(argv or sys.argv[1:])]),
               "results": results}
    out.write_text(json.dumps(summary, indent=2))
    md = table(results, peak, machine)
    out.with_suffix(".md").write_text(md)
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:
        print("[bench] matplotlib missing: no plot", file=sys.stderr)
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
