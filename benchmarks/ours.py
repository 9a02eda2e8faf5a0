"""One of OUR programs (ppo_jax, ppo_torch eager, ppo_torch + torch.compile) on the shared PPO
workload (`benchmarks/peers/workload.py`: the same sizes, prompts and schedule the TRL and Tunix
peers run), timed per phase. Run by `benchmarks/run.py`, one subprocess per program, or by hand:

    python -m benchmarks.ours --program jax --model tiny1m --iterations 5 --out r.json

Phases (each blocks on its result before the clock stops): generation (KV-cache sampling),
forward (policy + reference log-probs, critic values, reward-model scores: one fused jit in JAX,
four no-grad passes in torch), reward (host-side: rollout to numpy, EOS bookkeeping), advantages
(KL-shaped rewards, GAE, whitening), update (4 epochs x 1 minibatch: forward + backward of policy
and critic, AdamW). Compile time = first iteration - median iteration. Compilations are counted
(JAX: XLA backend compilations; torch.compile: dynamo graph compilations) during warm-up and
during the timed iterations (which must be 0). FLOPs are analytic (see `flops.py`).

Threads (`--threads N`, the same N for every program of a `benchmarks.run` suite): torch
`set_num_threads(N)`; XLA: the process is pinned to N cores (`sched_setaffinity`, before JAX is
imported: XLA sizes its intra-op pool from the schedulable CPUs) and, for N = 1, Eigen runs
single-threaded (`--xla_cpu_multi_thread_eigen=false`). Every wall time has a process-CPU-time
twin (`iteration_cpu_s`, `phases.*.median_cpu_s`: all threads of this process), which other
processes on a shared machine disturb far less.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import workload as W  # noqa: E402  (benchmarks/peers/workload.py: pure python + numpy)

_THREADS = W.threads_from_argv()

from benchmarks import (  # noqa: E402
    compile_every_program,
    flops,
)
from ppo_rlhf.config import REMATS  # noqa: E402  (pure python: imports neither jax nor torch)

PROGRAMS = ("jax", "torch", "torch-compile")


def set_threads(n: int | None) -> dict:
    """Limit this process to `n` compute threads, before jax / torch are imported (see the
    module docstring). Returns what was set (recorded in the JSON)."""
    if not n:
        return {}
    out = {"threads": n}
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, cpus[:n])
        out["affinity"] = sorted(os.sched_getaffinity(0))
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return out


class StandInTokenizer:
    """What the trainers read from a tokenizer when fed token ids: its length (vocabulary check)
    and pad / EOS ids (None: fixed-length responses). The benchmark checkpoints have no tokenizer
    files (a byte-level BPE needs more ids than the demo's 128)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, 0, None

    def __len__(self) -> int:
        return self.vocab_size


@contextlib.contextmanager
def around_each_phase(around):
    """While the block runs, every `ppo_rlhf.runtime.metrics.phase_timer` block also runs inside
    `around(name)` (a context manager; entered before the phase's timer, left after it). In
    memory only: the trainers' phase timers stay as they are."""
    from ppo_rlhf.runtime import metrics

    orig = metrics.phase_timer

    @contextlib.contextmanager
    def phase_timer(times, name, block=None):
        with around(name), orig(times, name, block=block):
            yield

    metrics.phase_timer = phase_timer
    try:
        yield
    finally:
        metrics.phase_timer = orig


def cpu_phase_times(cpu: dict):
    """Also record process CPU time of every phase into cpu[name] (`around_each_phase`)."""

    @contextlib.contextmanager
    def cpu_time(name):
        c0 = time.process_time()
        yield
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0

    return around_each_phase(cpu_time)


def make_checkpoints(spec: W.ModelSpec, root: Path) -> tuple[Path, Path]:
    """A random-weight GPT-2 policy and a random-weight reward model (GPT2ForSequenceClassification
    format) at `spec`'s size, cached under `root`."""
    policy, rm = root / f"{spec.name}-{spec.n_layer}-{spec.n_embd}-{spec.vocab_size}", None
    rm = policy.with_name(policy.name + "-rm")
    if not (policy / "config.json").is_file() or not (rm / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head,
                         vocab_size=spec.vocab_size, n_positions=spec.n_positions,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
        GPT2LMHeadModel(cfg).save_pretrained(str(policy))
        from ppo_torch.models import save_pretrained, scalar_model_from_lm

        save_pretrained(scalar_model_from_lm(str(policy), seed=1), rm)
    return policy, rm


@contextlib.contextmanager
def count_compilations(program: str):
    """Yields a list that grows by one per compilation while the block runs."""
    events: list[str] = []
    if program == "jax":
        from ppo_rlhf.testing import count_jax_compilations

        with count_jax_compilations() as events:
            yield events
    elif program == "torch-compile":
        from torch._dynamo.utils import counters

        before = int(counters["stats"].get("unique_graphs", 0))
        yield events
        events.extend(["graph"] * (int(counters["stats"].get("unique_graphs", 0)) - before))
    else:
        yield events


def build_trainer(program: str, spec: W.ModelSpec, wl: W.Workload, policy_dir: Path, rm_dir: Path, *,
                  scan_unroll: bool = False, remat: str = "none",
                  threads: int | None = None) -> tuple[Any, dict]:
    """The PPO trainer of `program` on the shared workload (fixed-length responses, the reward
    model at `rm_dir`), and the versions to record."""
    from ppo_rlhf import PPOConfig

    config = PPOConfig(batch_size=wl.batch, max_prompt_len=wl.prompt_len, max_new_tokens=wl.response_len,
                       ppo_epochs=wl.ppo_epochs, num_minibatches=wl.minibatches, temperature=wl.temperature,
                       learning_rate=wl.lr, kl_coef=wl.kl_coef, gamma=wl.gamma, lam=wl.lam,
                       clip_eps=wl.cliprange, value_clip_eps=wl.cliprange_value, seed=wl.seed,
                       scan_unroll=scan_unroll, remat=remat)
    kw = dict(config=config, eos_token_id=None, pad_token_id=0,  # fixed-length responses
              tokenizer=StandInTokenizer(spec.vocab_size))
    if program == "jax":
        import jax

        from ppo_jax.ppo import PPOTrainer

        trainer = PPOTrainer(str(policy_dir), str(rm_dir), **kw)
        return trainer, {"jax": jax.__version__, "backend": jax.default_backend(),
                         "xla_flags": os.environ.get("XLA_FLAGS", "")}
    import torch

    from ppo_torch.ppo import PPOTrainer

    if threads:
        torch.set_num_threads(threads)
    trainer = PPOTrainer(str(policy_dir), str(rm_dir), compile=program == "torch-compile", **kw)
    return trainer, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--program", choices=PROGRAMS, required=True)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "ppo-rlhf-bench"))
    W.add_cli_args(p)
    p.add_argument("--scan-unroll", action="store_true",
                   help="PPOConfig.scan_unroll: the JAX scan over layers fully unrolled (torch: no effect)")
    p.add_argument("--remat", default="none", choices=REMATS,
                   help="PPOConfig.remat: activation checkpointing of the update's forwards")
    args = p.parse_args(argv)
    compile_every_program()  # compile time is measured here
    threads = set_threads(args.threads)
    if args.wait_quiet:
        W.wait_quiet(args.wait_quiet)
    spec, wl = W.spec_from_args(args), W.workload_from_args(args)
    policy_dir, rm_dir = make_checkpoints(spec, Path(args.cache_dir))

    trainer, versions = build_trainer(args.program, spec, wl, policy_dir, rm_dir,
                                      scan_unroll=args.scan_unroll, remat=args.remat, threads=args.threads)
    prompts = W.prompt_ids(spec, wl, args.warmup + args.iterations)
    import numpy as np

    mask = np.ones(prompts.shape[1:], np.int32)
    timer = W.PhaseTimer()
    names = {"time/generate_s": "generation", "time/forward_s": "forward", "time/reward_s": "reward",
             "time/advantages_s": "advantages", "time/update_s": "update"}
    iteration_times, warmup_times, cpu_times, compiles = [], [], [], {}
    for i in range(args.warmup + args.iterations):
        phase = "warmup" if i < args.warmup else "timed"
        cpu: dict[str, float] = {}
        with count_compilations(args.program) as events, cpu_phase_times(cpu):
            t0, c0 = time.perf_counter(), time.process_time()
            stats = trainer.step(i, query_ids=prompts[i], query_mask=mask)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        compiles[phase] = compiles.get(phase, 0) + len(events)
        for k, name in names.items():
            timer.add(name, stats[k], cpu.get(k))
        timer.end_iteration()
        cpu_times.append(dc)
        (warmup_times if i < args.warmup else iteration_times).append(dt)
    fl = flops.iteration_flops(spec, wl)
    result = W.build_result(
        program={"jax": "ppo_jax", "torch": "ppo_torch", "torch-compile": "ppo_torch+compile"}[args.program],
        spec=spec, wl=wl, config_extra={"reward": "model", "scan_unroll": trainer.config.scan_unroll,
                                            "remat": trainer.config.remat}, iteration_times=iteration_times,
        warmup_times=warmup_times, timer=timer, n_warmup=args.warmup, versions=versions,
        iteration_cpu_times=cpu_times,
        notes=["forward = policy + reference log-probs, critic values and reward scores"],
        extra={"compilations": compiles, "flops": fl, "threads": threads,
               "compile_s": (warmup_times[0] - W.median(iteration_times)) if warmup_times else None},
    )
    W.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
