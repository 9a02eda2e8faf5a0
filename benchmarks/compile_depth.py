"""Compile time of a JAX PPO iteration against model depth: 2 vs 24 layers at the same width.

    python -m benchmarks.compile_depth                        # gpt2, hidden 64, layers 2 and 24
    python -m benchmarks.compile_depth --arch llama --layers 2 12 24 --remat dots

For each depth, a tiny random checkpoint (`ppo_rlhf.testing.make_tiny_checkpoint`, hidden 64,
4 heads, vocab 512) is trained by `ppo_jax.ppo.PPOTrainer` for `--iterations` iterations on
the same prompts with a host-side reward function, after an untimed 1-layer run that takes
JAX's one-time start-up costs; compile time = the first iteration's wall time minus the median
of the later ones (tracing + lowering + XLA compilation of generation,
the scoring forwards, advantages and the update), and the XLA backend compile time alone
(`backend_compile_s`, summed from JAX's monitoring events); `compile_cpu_s` is the same
difference in process CPU time, which neighbours on a shared machine disturb far less. All
depths run in ONE process, one after the other, so the ratios are measured under the same load.
With stacked, scanned layers the compiled programs do not grow with depth: the target is a
24-layer compile time <= 1.5x the 2-layer one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import compile_every_program


def measure(arch: str, layers: int, *, iterations: int, remat: str | None, root: Path) -> dict:
    import jax

    from ppo_jax.ppo import PPOTrainer
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch, make_tiny_checkpoint

    depth_key = {"gpt2": "n_layer"}.get(arch, "num_hidden_layers")
    ckpt = make_tiny_checkpoint(root / f"{arch}-{layers}", arch, **{depth_key: layers})
    config = PPOConfig(batch_size=8, max_prompt_len=8, max_new_tokens=8, ppo_epochs=2,
                       num_minibatches=2, learning_rate=1e-4)
    if remat is not None:  # PPOConfig.remat: the trainer sets it on its policy and critic
        config = config.replace(remat=remat)
    trainer = PPOTrainer(str(ckpt), lambda prompts, responses: [0.1 * len(r) for r in responses],
                         config=config, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    compile_s: list[float] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_s.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    times, cpu, backend = [], [], []
    try:
        for it in range(iterations):
            q, qm, _, _ = make_padded_batch(it, 8, 8, 1, vocab_size=512)
            n0 = len(compile_s)
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.step(it, query_ids=q, query_mask=qm)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            backend.append(sum(compile_s[n0:]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    later = statistics.median(times[1:])
    return {"arch": arch, "layers": layers, "first_s": times[0], "median_later_s": later,
            "compile_s": times[0] - later,
            "compile_cpu_s": cpu[0] - statistics.median(cpu[1:]), "backend_compile_s": backend[0],
            "later_backend_compile_s": sum(backend[1:])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "llama", "qwen2", "gpt_neox"))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 24])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--remat", default=None, choices=(None, "none", "full", "dots"))
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    args = ap.parse_args(argv)
    compile_every_program()  # compile time is measured here
    with tempfile.TemporaryDirectory() as tmp:
        # an untimed first run: JAX's one-time costs (backend start-up, eager helper programs)
        # must not land on the first depth measured
        measure(args.arch, 1, iterations=2, remat=args.remat, root=Path(tmp) / "warmup")
        rows = [measure(args.arch, n, iterations=args.iterations, remat=args.remat, root=Path(tmp))
                for n in args.layers]
    print(f"{'layers':>6} {'first s':>8} {'later s':>8} {'compile s':>9} {'ratio':>6} "
          f"{'compile CPU s':>13} {'ratio':>6} {'XLA s':>7}")
    for r in rows:
        r["compile_ratio"] = r["compile_s"] / rows[0]["compile_s"]
        r["compile_cpu_ratio"] = r["compile_cpu_s"] / rows[0]["compile_cpu_s"]
        print(f"{r['layers']:>6} {r['first_s']:>8.2f} {r['median_later_s']:>8.3f} "
              f"{r['compile_s']:>9.2f} {r['compile_ratio']:>6.2f} {r['compile_cpu_s']:>13.2f} "
              f"{r['compile_cpu_ratio']:>6.2f} {r['backend_compile_s']:>7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
