"""Time of one supervised (SFT / pretraining) optimiser step, per backend and remat policy, with
what the operating system saw: system time and page faults per step.

    python -m benchmarks.supervised_step                       # the demo's pretraining shape
    python -m benchmarks.supervised_step --steps 200 --remat none full dots
    python -m benchmarks.supervised_step --backends jax --remat full --scan-unroll both

The demo's model ("small": GPT-2 style, 4 layers, width 128) with a 128-token vocabulary, a
batch of 32 x 32 tokens (the demo's pretraining batch), random tokens; `SFTTrainer._train_step`
(the whole step as `fit` runs it: host batch -> device, forward, backward, clip, AdamW,
statistics back to the host) timed over `--steps` steps after 3 untimed ones. Each (backend,
remat) runs in its own process, one after the other; quote ratios from one run. For JAX the
compiled step's scratch memory (`memory_analysis().temp_size_in_bytes`) is reported too: an
XLA:CPU scratch buffer above glibc's 64 MiB per-thread heap is mmapped and page-faulted afresh
at every step, which shows as system time and ~temp/4096 minor faults per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BATCH, LENGTH, VOCAB = 32, 32, 128


def measure(backend: str, remat: str, steps: int, unroll: bool = False) -> dict:
    import numpy as np

    from ppo_rlhf.config import SFTConfig
    from ppo_rlhf.hf_checkpoint import write_fresh_checkpoint
    from ppo_rlhf.tasks.reviews.model import build_tokenizer, demo_model_config

    ckpt = tempfile.mkdtemp(prefix="sft-step-")
    build_tokenizer(ckpt)  # the trainer wants one (about 120 tokens: fits the 128 of the model)
    write_fresh_checkpoint(ckpt, demo_model_config("small", vocab_size=VOCAB), seed=0)
    sft = __import__(f"ppo_{backend}.sft", fromlist=["SFTTrainer"])
    trainer = sft.SFTTrainer(ckpt, SFTConfig(num_steps=steps, batch_size=BATCH, max_length=LENGTH,
                                             remat=remat, scan_unroll=unroll), tokenizer=None)
    trainer._init_optimizer(steps)
    rng = np.random.default_rng(0)

    def batch() -> dict:
        ids = rng.integers(3, VOCAB, (BATCH, LENGTH))
        ones = np.ones((BATCH, LENGTH), np.int64)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones.copy()}

    out: dict = {"backend": backend, "remat": remat, "scan_unroll": unroll, "steps": steps}
    if backend == "jax":
        import jax.numpy as jnp

        b = {k: jnp.asarray(v, jnp.int32) for k, v in batch().items()}
        compiled = trainer._step.lower(trainer.params, trainer.opt_state, trainer._rest, b, 1e-3).compile()
        out["temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 1e6
    for _ in range(3):
        trainer._train_step(batch(), 1e-3)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        trainer._train_step(batch(), 1e-3)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out.update(step_ms=1e3 * (t1 - t0) / steps, user_ms=1e3 * (r1.ru_utime - r0.ru_utime) / steps,
               sys_ms=1e3 * (r1.ru_stime - r0.ru_stime) / steps,
               minor_faults=(r1.ru_minflt - r0.ru_minflt) / steps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    ap.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"])
    ap.add_argument("--scan-unroll", choices=["off", "on", "both"], default="off",
                    help="SFTConfig.scan_unroll (JAX: the layer scan unrolled; torch: no effect)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="JSON file for the rows (default: print only)")
    ap.add_argument("--one", nargs=3, metavar=("BACKEND", "REMAT", "UNROLL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    if args.one:  # the child: one measurement, one JSON line
        backend, remat, unroll = args.one
        print(json.dumps(measure(backend, remat, args.steps, unroll == "on")))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_ENABLE_COMPILATION_CACHE": "false"}
    rows = []
    unrolls = ["off", "on"] if args.scan_unroll == "both" else [args.scan_unroll]
    print("| backend | remat | scan unroll | step ms | user ms | sys ms | minor faults | XLA temp MB |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in args.backends:
        for remat in args.remat:
            for unroll in unrolls:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.supervised_step", "--one", backend,
                                       remat, unroll, "--steps", str(args.steps)], capture_output=True,
                                      text=True, env=env, check=False)
                if proc.returncode:
                    raise SystemExit(f"{backend} remat={remat} unroll={unroll} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                temp = f"{row['temp_mb']:.1f}" if "temp_mb" in row else "--"
                print(f"| {backend} | {remat} | {unroll} | {row['step_ms']:.1f} | {row['user_ms']:.1f} | "
                      f"{row['sys_ms']:.1f} | {row['minor_faults']:.0f} | {temp} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": BATCH, "length": LENGTH, "vocab": VOCAB, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
