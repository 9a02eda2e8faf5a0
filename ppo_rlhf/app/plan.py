"""`ppo-rlhf plan`: compile one training iteration (PPO; or one step of reward-model training or
SFT: --trainer rm|sft) for a TPU topology (or NVIDIA GPUs: --topology h100[:N]) from this machine
and say whether it fits, per chip, before a pod is rented (JAX only; `ppo_jax.plan` does the work).

Exit codes: 0 = fits, 1 = does not fit, 2 = bad input (one line)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ppo_rlhf.app.backends import get_backend
from ppo_rlhf.errors import UsageError

CONFIGS = {"ppo": "PPOConfig", "rm": "RMConfig", "sft": "SFTConfig"}
"""--trainer -> the config class whose fields --set sets."""


def _config_dir(path: str | None, what: str) -> str | None:
    """A checkpoint dir, or the dir of a config.json given as a file, or a PEFT adapter dir (its
    base's config.json: the loaders read it)."""
    from ppo_rlhf.lora import adapter_base

    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and adapter_base(p) is not None:
        return str(p)
    if p.is_file():
        if p.name != "config.json":
            raise UsageError(f"{what} {path!r}: give a Hugging Face config.json or the dir that holds one")
        p = p.parent
    if not (p / "config.json").is_file():
        raise UsageError(f"{what} {path!r}: no config.json there")
    return str(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="compile one iteration for a TPU topology (or H100s) here; memory per chip, fits or not",
        description="Compile every program of one PPO iteration (generation: prefill + decode "
                    "loop; the scoring forwards; advantages; the update) -- or, with --trainer "
                    "rm|sft, the training step and the evaluation forward of reward-model "
                    "training or SFT -- for a TPU topology (or H100 GPUs) from "
                    "this machine -- models from config.json alone, no weights -- and print, per "
                    "chip and per program, XLA's argument / temporary / output / aliased bytes, "
                    "the resident total (every model's weights and the optimiser state) and the "
                    "peak, then whether the iteration fits the chip's HBM. Exit 0 = fits, "
                    "1 = does not fit, 2 = bad input. Needs libtpu (TPU) or jax's CUDA PJRT plugin "
                    "(GPU); make setup installs both.")
    p.add_argument("--model", required=True, metavar="CONFIG_OR_DIR",
                   help="the policy (--trainer rm: the reward model to train; sft: the causal LM): a "
                        "Hugging Face config.json or a dir holding one (no weights needed)")
    p.add_argument("--reward-model", metavar="CONFIG_OR_DIR",
                   help="ppo only: the reward model (a scalar head on this trunk; a causal LM's "
                        "config.json serves); the critic is copied from it. Default: a reward "
                        "function (scored on the host) and a critic copied from the policy")
    p.add_argument("--topology", required=True,
                   help="libtpu's name of the slice: v5e:2x2 (4 chips), v5e:2x4, v5p:2x2x1 (4 chips), "
                        "v6e:2x4, v4:2x2x1, ...; h100 (one H100 SXM 80 GB), h100:N (N in one host), "
                        "h100:HxN (H hosts of N): checked against JAX's allocator share, "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75); or cpu (this machine, to "
                        "check the accounting)")
    p.add_argument("--trainer", choices=tuple(CONFIGS), default="ppo",
                   help="what to plan: ppo (one iteration: generate, rollout_forward, advantages, "
                        "update), rm (reward-model training: train_step on batch_size groups of "
                        "2 sequences of max_length tokens, eval_step) or sft (train_step and "
                        "eval_step on batch_size x max_length); default: ppo")
    p.add_argument("--mesh", help="mesh axes, e.g. data=2,fsdp=4 (default: fsdp over every chip)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the weights' dtype (float32: float32 master weights and AdamW state; default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the trainer's config (PPOConfig; --trainer rm: RMConfig; sft: "
                        "SFTConfig), e.g. --set batch_size=64 --set remat=full (repeatable)")
    p.add_argument("--max-batch", action="store_true",
                   help="find the largest batch_size that fits (bisection on compiles, progress on stderr)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ppo_rlhf import config as configs
    from ppo_rlhf.app.train import build_config

    if args.reward_model is not None and args.trainer != "ppo":
        raise UsageError(f"--reward-model is for --trainer ppo (--trainer {args.trainer} trains --model)")
    model = _config_dir(args.model, "--model")
    reward = _config_dir(args.reward_model, "--reward-model")
    config = build_config(args, getattr(configs, CONFIGS[args.trainer]))
    # several processes may load libtpu here at once (tests, a table): it allows one by default
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ:  # compile-only: no TPU runtime to start (and no noise)
        import jax

        jax.config.update("jax_platforms", "cpu")
    planner = get_backend("jax").planner  # the one core that compiles ahead of time
    devices, _ = planner.topology_devices(args.topology)  # a bad name: exit 2 before anything else

    def progress(msg: str) -> None:
        print(f"ppo-rlhf plan: {msg}", file=sys.stderr, flush=True)

    def one(batch_size: int):
        try:
            cfg = config.replace(batch_size=batch_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        kw = dict(topology=args.topology, mesh=args.mesh, dtype=args.dtype, progress=progress)
        if args.trainer == "ppo":
            return cfg, planner.plan_ppo(model, reward, cfg, **kw)
        return cfg, (planner.plan_rm if args.trainer == "rm" else planner.plan_sft)(model, cfg, **kw)

    if args.max_batch:
        ways = planner.data_parallel_ways(args.mesh, devices)
        # PPO: every micro-batch splits over the data-parallel ways; RM / SFT: the batch
        unit = getattr(config, "num_minibatches", 1) * getattr(config, "grad_accum_steps", 1) * ways
        best, plan = planner.max_batch_size(lambda b: one(b)[1], unit, config.batch_size, progress)
        if plan is None:  # not even the smallest batch: report that one
            cfg, plan = one(unit)
        else:
            cfg = config.replace(batch_size=best)
        plan.max_batch_size = best
    else:
        cfg, plan = one(config.batch_size)
    print(planner.format_plan(plan, cfg))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return 0 if plan.fits else 1
