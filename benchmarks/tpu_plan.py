"""The TPU table: PPO with a separate critic and a reward model on the policy's trunk, compiled for
TPU slices from this CPU machine (`ppo_jax.plan`), for the model shapes users train.

    python -m benchmarks.tpu_plan --models qwen2.5-0.5b --topologies v5e:2x2 --settings best \\
        --batches 64,128,256 --out benchmarks/results/tpu-plan.json

For each (model, topology, setting) it plans the batch sizes of --batches in increasing order
and stops at the first that does not fit: the largest that fits is the cell's answer (a lower
bound on the true maximum: only the listed sizes are tried). Each plan is one compilation of
every program of an iteration; the JSON (rewritten after every plan, so a long run keeps what
it measured) and a markdown table next to it hold each plan's peak per chip and compile time.

Models: `benchmarks/configs/<name>/config.json` (Qwen2.5-0.5B, -1.5B, -7B, Llama-3.1-8B: the
published hyper-parameters, written offline; no weights). Workload: 512 prompt + 512 response
tokens, 1 PPO epoch, 1 minibatch. Settings:
  default  PPOConfig's defaults: float32 weights and compute, remat none, no log-prob chunks,
           float32 frozen models, the whole batch in one micro-batch
  best     remat full, logprob_chunk 64, compute_dtype bfloat16, frozen_dtype bfloat16, and
           micro-batches of --micro-batch rows (grad_accum_steps = batch / micro-batch):
           float32 master weights and AdamW state stay
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b")
TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v6e:2x4")
BEST = dict(remat="full", logprob_chunk=64, compute_dtype="bfloat16", frozen_dtype="bfloat16")


def config_for(setting: str, batch: int, micro: int, length: int = 512, minibatch: int = 0):
    from ppo_rlhf import PPOConfig

    base = dict(batch_size=batch, max_prompt_len=length, max_new_tokens=length, ppo_epochs=1)
    if setting == "default":
        return PPOConfig(**base)
    mb = minibatch or batch
    return PPOConfig(**base, **BEST, num_minibatches=batch // mb, grad_accum_steps=max(mb // micro, 1))


def markdown(rows: list[dict]) -> str:
    out = ["| model | topology | mesh | setting | batch | minibatch | micro-batch | peak GiB / chip | HBM GiB "
           "| fits | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['topology']} | {r.get('mesh', 'fsdp=' + str(r['chips']))} | "
                   f"{r['setting']} | {r['batch_size']} | "
                   f"{r['batch_size'] // r.get('num_minibatches', 1)} | "
                   f"{r['batch_size'] // r.get('num_minibatches', 1) // r['grad_accum_steps']} | "
                   f"{r['peak_bytes'] / 2**30:.2f} | {r['hbm_bytes_per_chip'] / 2**30:.0f} | "
                   f"{'yes' if r['fits'] else 'no'} | {r['compile_s']:.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--settings", default="default,best")
    ap.add_argument("--batches", default="8,16,32,64,128,256")
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per micro-batch (best)")
    ap.add_argument("--length", type=int, default=512, help="prompt tokens = response tokens")
    ap.add_argument("--minibatch", type=int, default=0,
                    help="rows per minibatch (best; num_minibatches = batch / minibatch; default: "
                         "the whole batch, one optimiser step per epoch)")
    ap.add_argument("--mesh", default=None,
                    help="mesh axes, e.g. fsdp=2,tensor=2 (default: fsdp over every chip); a row "
                         "is keyed by it")
    ap.add_argument("--out", default=str(HERE / "results" / "tpu-plan.json"))
    ap.add_argument("--config-dir", default=str(CONFIGS), help="where <model>/config.json lie")
    args = ap.parse_args(argv)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    from ppo_jax.plan import plan_ppo

    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {"plans": []}
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "jax": jax.__version__}
    batches = sorted(int(b) for b in args.batches.split(","))
    for model in args.models.split(","):
        for topo in args.topologies.split(","):
            for setting in args.settings.split(","):
                for b in batches:
                    cfg = config_for(setting, b, args.micro_batch, args.length, args.minibatch)
                    t0 = time.perf_counter()
                    load0 = os.getloadavg()[0]
                    config_json = str(Path(args.config_dir) / model)
                    plan = plan_ppo(config_json, config_json, cfg, topology=topo, mesh=args.mesh,
                                    progress=lambda s: print(f"  {model} {topo} {setting}: {s}",
                                                             file=sys.stderr, flush=True))
                    row = {"model": model, "topology": topo, "setting": setting, "batch_size": b,
                           "mesh": plan.mesh,
                           "num_minibatches": cfg.num_minibatches,
                           "grad_accum_steps": cfg.grad_accum_steps, "chips": plan.chips,
                           "hbm_bytes_per_chip": plan.hbm_bytes_per_chip, "peak_bytes": plan.peak_bytes,
                           "resident_state_bytes": plan.resident_state_bytes, "fits": plan.fits,
                           "compile_s": plan.compile_s, "wall_s": time.perf_counter() - t0,
                           "load_avg_1m_at_start": load0,
                           "programs": [vars(p) for p in plan.programs],
                           "command": "python -m benchmarks.tpu_plan " + " ".join(argv or sys.argv[1:])}
                    key = (model, topo, setting, b, cfg.num_minibatches, cfg.grad_accum_steps, plan.mesh)
                    if out.is_file():  # another run may have written rows meanwhile: keep them
                        record["plans"] = json.loads(out.read_text())["plans"]
                    record["plans"] = [r for r in record["plans"] if (
                        r["model"], r["topology"], r["setting"], r["batch_size"], r.get("num_minibatches", 1),
                        r["grad_accum_steps"], r.get("mesh", f"fsdp={r['chips']}")) != key] + [row]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(record, indent=1) + "\n")
                    out.with_suffix(".md").write_text(markdown(record["plans"]))
                    print(f"{model} {topo} {setting} batch {b}: peak {plan.peak_bytes / 2**30:.2f} GiB "
                          f"-> {'fits' if plan.fits else 'does not fit'} ({plan.compile_s:.0f} s)", flush=True)
                    if not plan.fits:
                        break
    return 0


if __name__ == "__main__":
    sys.exit(main())
