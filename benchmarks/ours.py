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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import workload as W  # noqa: E402  (benchmarks/peers/workload.py: pure python + numpy)

from benchmarks import flops  # noqa: E402

PROGRAMS = ("jax", "torch", "torch-compile")


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
        import jax

        def listener(event, duration, **kw):
            if event == "/jax/core/compile/backend_compile_duration":
                events.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            yield events
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    elif program == "torch-compile":
        from torch._dynamo.utils import counters

        before = int(counters["stats"].get("unique_graphs", 0))
        yield events
        events.extend(["graph"] * (int(counters["stats"].get("unique_graphs", 0)) - before))
    else:
        yield events


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--program", choices=PROGRAMS, required=True)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "ppo-rlhf-bench"))
    W.add_cli_args(p)
    args = p.parse_args(argv)
    if args.wait_quiet:
        W.wait_quiet(args.wait_quiet)
    spec, wl = W.spec_from_args(args), W.workload_from_args(args)
    policy_dir, rm_dir = make_checkpoints(spec, Path(args.cache_dir))

    from ppo_rlhf import PPOConfig

    config = PPOConfig(batch_size=wl.batch, max_prompt_len=wl.prompt_len, max_new_tokens=wl.response_len,
                       ppo_epochs=wl.ppo_epochs, num_minibatches=wl.minibatches, temperature=wl.temperature,
                       learning_rate=wl.lr, kl_coef=wl.kl_coef, gamma=wl.gamma, lam=wl.lam,
                       clip_eps=wl.cliprange, value_clip_eps=wl.cliprange_value, seed=wl.seed)
    kw = dict(config=config, eos_token_id=None, pad_token_id=0)  # fixed-length responses
    if args.program == "jax":
        import jax

        from ppo_jax.ppo import PPOTrainer

        trainer = PPOTrainer(str(policy_dir), str(rm_dir), **kw)
        versions = {"jax": jax.__version__, "backend": jax.default_backend()}
    else:
        import torch

        from ppo_torch.ppo import PPOTrainer

        trainer = PPOTrainer(str(policy_dir), str(rm_dir), compile=args.program == "torch-compile", **kw)
        versions = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    prompts = W.prompt_ids(spec, wl, args.warmup + args.iterations)
    import numpy as np

    mask = np.ones(prompts.shape[1:], np.int32)
    timer = W.PhaseTimer()
    names = {"time/generate_s": "generation", "time/forward_s": "forward", "time/reward_s": "reward",
             "time/advantages_s": "advantages", "time/update_s": "update"}
    iteration_times, warmup_times, compiles = [], [], {}
    for i in range(args.warmup + args.iterations):
        phase = "warmup" if i < args.warmup else "timed"
        with count_compilations(args.program) as events:
            t0 = time.perf_counter()
            stats = trainer.step(i, query_ids=prompts[i], query_mask=mask)
            dt = time.perf_counter() - t0
        compiles[phase] = compiles.get(phase, 0) + len(events)
        for k, name in names.items():
            timer.add(name, stats[k])
        timer.end_iteration()
        (warmup_times if i < args.warmup else iteration_times).append(dt)
    fl = flops.iteration_flops(spec, wl)
    result = W.build_result(
        program={"jax": "ppo_jax", "torch": "ppo_torch", "torch-compile": "ppo_torch+compile"}[args.program],
        spec=spec, wl=wl, config_extra={"reward": "model"}, iteration_times=iteration_times,
        warmup_times=warmup_times, timer=timer, n_warmup=args.warmup, versions=versions,
        notes=["forward = policy + reference log-probs, critic values and reward scores"],
        extra={"compilations": compiles, "flops": fl,
               "compile_s": (warmup_times[0] - W.median(iteration_times)) if warmup_times else None},
    )
    W.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
