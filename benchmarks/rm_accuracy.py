"""Reward-model accuracy against the synthetic labeller's noise ceiling, in both backends (issue 4's
"done when").

    python -m benchmarks.rm_accuracy                               # the full measurement (~30 min on 2 CPUs)
    python -m benchmarks.rm_accuracy --pairs 4000 --epochs 6       # less data, more epochs
    python -m benchmarks.rm_accuracy --quick                       # smoke test (< 1 min)

What it does, each step through the public interfaces:
  1. pretrains the demo's policy model (`ppo-rlhf pretrain`'s code, JAX, `--model-size`,
     `--pretrain-steps`) once, cached under `--cache-dir` (or takes `--model DIR`);
  2. writes `--pairs` training preferences (`reviews.preference_data`: pairs of corpus-like
     reviews for the task's train prompts, labelled by the synthetic labeller at temperature 0.2)
     and `--eval-pairs` held-out ones for the task's EVAL prompts -- prompts never trained on;
  3. runs `ppo-rlhf train-rm --backend B` on them for each backend, from the same checkpoint,
     with the same hyperparameters;
  4. reports per backend the held-out pairwise accuracy (against the sampled labels), the expected
     accuracy (the same, in expectation over the label noise: `ppo_rlhf.feedback.labeller.expected_accuracy`)
     and the labeller's noise ceiling on the held-out pairs, plus train accuracy and wall time.

Writes JSON (with the exact commands) and a markdown table next to it.
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

from benchmarks import compile_every_program

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKENDS = ("jax", "torch")


def pretrained(args: argparse.Namespace) -> Path:
    """The starting checkpoint: --model, or the demo model pretrained here once (cached)."""
    if args.model:
        return Path(args.model)
    d = Path(args.cache_dir) / f"pt-{args.model_size}-{args.pretrain_steps}-seed{args.seed}"
    if not (d / "metrics.json").exists():
        from ppo_rlhf.app.pipelines import pretrain_model

        print(f"[rm-accuracy] pretraining the {args.model_size} demo model, {args.pretrain_steps} "
              f"steps (JAX) -> {d}", file=sys.stderr, flush=True)
        pretrain_model("jax", d, task="reviews",
                       config={"num_steps": args.pretrain_steps, "seed": args.seed},
                       model_size=args.model_size, eval_samples=0, progress=not args.no_progress)
    return d


def write_data(args: argparse.Namespace, where: Path) -> tuple[Path, Path, float, float]:
    """(train file, eval file, train noise ceiling, eval noise ceiling)."""
    from ppo_rlhf.data import write_records
    from ppo_rlhf.tasks import reviews

    train = reviews.preference_data(args.pairs, seed=args.seed + 11, temperature=args.temperature)
    held_out = reviews.preference_data(args.eval_pairs, seed=args.seed + 12, split="eval",
                                       temperature=args.temperature)
    write_records(where / "train.jsonl", train.records)
    write_records(where / "eval.jsonl", held_out.records)
    return where / "train.jsonl", where / "eval.jsonl", train.noise_ceiling, held_out.noise_ceiling


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--pairs", type=int, default=16000, help="training pairs (default: 16000)")
    p.add_argument("--eval-pairs", type=int, default=1000, help="held-out pairs (default: 1000)")
    p.add_argument("--temperature", type=float, default=0.2, help="labeller temperature")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--model", help="starting checkpoint (default: pretrain the demo model)")
    p.add_argument("--model-size", default="small", help="demo model size to pretrain")
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, 20 pretraining steps, 64 pairs, 1 epoch")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "ppo-rlhf-rm-accuracy"))
    p.add_argument("--out", help="JSON file (default: benchmarks/results/rm-accuracy-<timestamp>.json)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.model_size, args.pretrain_steps, args.pairs, args.eval_pairs, args.epochs = "tiny", 20, 64, 32, 1
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    for name in ("pairs", "eval_pairs", "epochs", "batch_size", "pretrain_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    out = Path(args.out) if args.out else HERE / "results" / f"rm-accuracy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    compile_every_program()  # each run's wall time includes its compilation (no XLA cache)

    from ppo_rlhf.tasks import reviews

    model = pretrained(args)
    max_length = reviews.MAX_PROMPT_TOKENS + reviews.MAX_RESPONSE_TOKENS + 2  # + EOS + 1, as the demo
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file, train_ceiling, eval_ceiling = write_data(args, Path(tmp))
        for b in backends:
            rm_dir = Path(tmp) / f"rm-{b}"
            cmd = [sys.executable, "-m", "ppo_rlhf", "train-rm", "--backend", b,
                   "--model", str(model), "--data", str(train_file), "--eval-data", str(eval_file),
                   "--out", str(rm_dir), "--epochs", str(args.epochs), "--lr", str(args.lr),
                   "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                   "--max-length", str(max_length), "--weight-decay", str(args.weight_decay)]
            if args.no_progress:
                cmd.append("--no-progress")
            print(f"[rm-accuracy] {b}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                  stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"[rm-accuracy] {b} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            m = json.loads((rm_dir / "metrics.json").read_text())
            results.append({
                "backend": b, "eval_accuracy": m["eval_accuracy"],
                "eval_expected_accuracy": m["eval_expected_accuracy"],
                "noise_ceiling": m["noise_ceiling"], "train_accuracy": m["train_accuracy"],
                "train_noise_ceiling": m["train_noise_ceiling"], "eval_pairs": m["eval_pairs"],
                "steps": m["steps"], "train_s": m["time_s"], "wall_s": time.perf_counter() - t0,
                "command": " ".join(["ppo-rlhf", *cmd[3:]])})
            print(proc.stdout.strip(), file=sys.stderr)
    given = argv if argv is not None else sys.argv[1:]
    summary = {"command": " ".join(["python", "-m", "benchmarks.rm_accuracy", *given]),
               "model": str(model), "pairs": args.pairs, "eval_pairs": args.eval_pairs,
               "temperature": args.temperature, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
               "batch_size": args.batch_size, "train_noise_ceiling": train_ceiling,
               "eval_noise_ceiling": eval_ceiling, "results": results}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    md = table(summary)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out}, {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def table(s: dict) -> str:
    lines = [f"`{s['command']}`: {s['pairs']} training pairs, {s['eval_pairs']} held-out pairs "
             f"(eval prompts), labeller temperature {s['temperature']}, {s['epochs']} epochs, "
             f"lr {s['lr']}, weight decay {s['weight_decay']}, batch {s['batch_size']}", "",
             "| backend | held-out accuracy | expected accuracy | noise ceiling | gap (expected) "
             "| train accuracy | steps | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["results"]:
        lines.append(f"| {r['backend']} | {r['eval_accuracy']:.4f} | {r['eval_expected_accuracy']:.4f} "
                     f"| {r['noise_ceiling']:.4f} | {r['noise_ceiling'] - r['eval_expected_accuracy']:.4f} "
                     f"| {r['train_accuracy']:.4f} | {r['steps']} | {r['train_s']:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
