"""`ppo-rlhf train` (PPO fine-tuning) and `ppo-rlhf eval` (evaluate a policy)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ppo_rlhf.app.args import add_lora_args, add_memory_args, add_run_args
from ppo_rlhf.app.backends import BACKENDS, get_backend
from ppo_rlhf.errors import UsageError


# ---- shared argument helpers ---------------------------------------------------------------------
def parse_set(items: list[str] | None) -> dict[str, Any]:
    """--set key=value (value parsed as JSON when it parses, else kept as a string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_config(args: argparse.Namespace, config_class: Any = None, **overrides: Any):
    """PPOConfig (or `config_class`: RMConfig, SFTConfig) from --config FILE.json, then --set
    key=value pairs, then explicit flags."""
    from ppo_rlhf.config import PPOConfig

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {str(path)!r}: no such file")
        try:
            values.update(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {str(path)!r}: not valid JSON ({e})") from None
    values.update(parse_set(getattr(args, "set", None)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return (config_class or PPOConfig).from_dict(values)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def check_lora_targets(config: Any, policy: str) -> None:
    """UsageError unless the policy's architecture has every `lora_targets` projection (GPT-2
    and GPT-NeoX have no gate) -- before minutes of loading."""
    from ppo_rlhf import hf_checkpoint as hfc
    from ppo_rlhf.lora import lora_modules

    if not config.lora_rank or not (Path(policy) / "config.json").is_file():
        return
    try:
        lora_modules(hfc.read_config(policy)["model_type"], config.lora_targets)
    except (ValueError, KeyError) as e:
        raise UsageError(f"--lora-targets: {e}") from None


def require_dir(path: str | None, what: str) -> str | None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{what} {path!r} is not a directory")
    return path


def load_prompts_arg(path: str) -> list[str]:
    from ppo_rlhf.data import load_prompts

    if not Path(path).is_file():
        raise UsageError(f"--prompts {path!r}: no such file")
    return load_prompts(path)


# ---- train --------------------------------------------------------------------------------------
def add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="PPO fine-tuning of a policy against a reward model or reward function",
        description="PPO fine-tuning (seed step 5). The run directory gets config.json, "
                    "metrics.jsonl (one line per iteration), checkpoints/ (atomic; --resume "
                    "continues from the newest valid one) and policy/ (the final policy, Hugging "
                    "Face format; with --lora-rank its PEFT adapter, whose adapter_config.json names "
                    "--policy as its base). SIGTERM/SIGINT finish the iteration, checkpoint and exit.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--policy", required=True, help="initial policy: Hugging Face checkpoint dir (+ tokenizer)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--reward-model", help="reward model dir (ppo-rlhf train-rm output)")
    g.add_argument("--reward-fn", help="a reward function module:function(prompts, responses) -> floats")
    p.add_argument("--prompts", required=True, help="prompt file: JSONL {\"prompt\": ...} or one per line")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--reference", help="reference policy dir (default: a frozen copy of --policy)")
    p.add_argument("--critic", help="critic dir (default: the reward model's weights, else the policy's)")
    p.add_argument("--shared-trunk", action="store_true",
                   help="critic = a value head on the policy's trunk (one forward pass)")
    p.add_argument("--config", help="PPOConfig as a JSON file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one PPOConfig field, e.g. --set kl_coef=0.1 (repeatable)")
    p.add_argument("--iterations", type=int, help="PPO iterations (PPOConfig.num_iterations)")
    p.add_argument("--seed", type=int, help="PPOConfig.seed")
    add_memory_args(p, config="PPOConfig", models="the policy's and critic's")
    add_lora_args(p, config="PPOConfig", roles="policy and / or critic (default: policy)",
                  saved="OUT/policy", merged="OUT/policy-merged")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the weights (and of the optimiser state); default float32")
    p.add_argument("--logprob-chunk", type=int, metavar="N",
                   help="compute log-probs and entropies N response positions at a time, so the "
                        "float32 [batch, response, vocab] logits never exist at once "
                        "(PPOConfig.logprob_chunk; default 0: all at once)")
    add_run_args(p, checkpoint_every=10, unit="iterations")
    s = p.add_argument_group("several devices (docs/distributed.md)")
    s.add_argument("--mesh", metavar="AXIS=N,...",
                   help="jax: shard over a device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, "
                        "tensor; their product = the number of devices, on all hosts)")
    s.add_argument("--multihost", action="store_true",
                   help="jax: call jax.distributed.initialize() (e.g. on every host of a Cloud "
                        "TPU slice); without it, only when JAX_COORDINATOR_ADDRESS, SLURM or "
                        "Open MPI name a multi-process job")
    s.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="torch, under torchrun: DDP or FSDP2 over the ranks (default under "
                        "torchrun with several ranks: ddp)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ppo_rlhf.lora import require_full_base
    from ppo_rlhf.rewards import load_reward_fn

    require_dir(args.policy, "--policy")
    require_dir(args.reward_model, "--reward-model")
    require_dir(args.reference, "--reference")
    require_dir(args.critic, "--critic")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every {args.checkpoint_every}: must be >= 0 (0 = only at "
                         f"the end)")
    config = build_config(args, num_iterations=args.iterations, seed=args.seed, remat=args.remat,
                          compute_dtype=args.compute_dtype, logprob_chunk=args.logprob_chunk,
                          scan_unroll=args.scan_unroll, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          lora_base_dtype=args.lora_base_dtype,
                          lora_targets=args.lora_targets,
                          lora_roles=args.lora_roles)
    if args.merge and not (config.lora_rank and "policy" in config.lora_roles):
        raise UsageError("--merge writes the policy's LoRA adapters merged into its base: it needs "
                         "--lora-rank (and 'policy' in --lora-roles)")
    check_lora_targets(config, args.policy)
    require_full_base(args.policy, "--policy", config.model_options("policy").lora)
    core = get_backend(args.backend)  # UsageError for a backend that is not installed
    scale = _scaling_kwargs(core, args, config)
    prompts = load_prompts_arg(args.prompts)
    if args.reward_fn:
        try:
            reward: Any = load_reward_fn(args.reward_fn)
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        reward = args.reward_model
    out = Path(args.out)
    if not args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("iter_*")):
        raise UsageError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                         f"or choose another --out")
    policy: Any = args.policy
    if args.shared_trunk:
        policy = core.load_pretrained(args.policy, args.dtype, with_value_head=True, seed=config.seed,
                                      options=config.model_options("policy"))
    # a shared trunk's reference: a frozen copy of --policy, or with LoRA its adapters off
    trainer = core.PPOTrainer(policy, reward, prompts, config=config, reference=args.reference or
                      (args.policy if args.shared_trunk and not config.lora_rank else None),
                      critic=args.critic,
                      tokenizer=args.policy, out_dir=out, dtype=args.dtype,
                      checkpoint_every=args.checkpoint_every, **scale)
    history = trainer.train(resume=args.resume, progress=not args.no_progress, report_to=args.report_to)
    trainer.save_policy(out / "policy")  # several processes: all take part, the main one writes
    if args.merge and config.lora_rank and "policy" in config.lora_roles:
        trainer.save_policy(out / "policy-merged", merge=True)
    if history and trainer.processes.is_main:
        last = history[-1]
        print(json.dumps({k: last[k] for k in ("iteration", "objective/scores", "objective/kl",
                                                "objective/kl_coef", "time/iteration_s") if k in last}))
        print(f"policy saved to {out / 'policy'}")
    if scale.get("distributed"):  # a torchrun rank: leave the group and exit here
        core.leave_processes(exit_code=0)
    return 0


def _scaling_kwargs(core: Any, args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The trainer's mesh= (a mesh core: jax) or distributed= (a torchrun core: torch) from
    --mesh / --multihost / --distributed."""
    from ppo_rlhf.runtime.processes import check_data_parallel, parse_mesh

    if core.scale_out == "torchrun":
        if args.mesh or args.multihost:
            raise UsageError("--mesh and --multihost are for --backend jax; with --backend torch "
                             "start ranks with torchrun and pass --distributed ddp|fsdp")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        strategy = args.distributed or ("ddp" if world > 1 else None)
        if strategy:
            check_data_parallel(config, world, f"--distributed {strategy} over {world} ranks")
        return {"distributed": strategy} if strategy else {}
    if args.distributed:
        raise UsageError("--distributed is for --backend torch; with --backend jax use --mesh "
                         "(e.g. --mesh data=2,fsdp=4)")
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_data_parallel(config, mesh.data_parallel, f"--mesh {mesh}")
    if core.join_processes(force=True if args.multihost else None) and mesh is None:
        raise UsageError("this is a multi-process JAX job: give --mesh (e.g. --mesh "
                         "data=2,fsdp=4) so that the processes train one model together")
    return {"mesh": mesh} if mesh is not None else {}


# ---- eval ---------------------------------------------------------------------------------------
def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a policy: reward-model score, gold score, KL, win-rate, samples",
        description="Evaluate a policy (seed step 6): the reward model's mean score of its "
                    "samples, the task's gold score (with --task), KL to the reference (mean over "
                    "prompts of the summed per-token log-ratio of the policy's samples), the "
                    "win-rate against the reference judged by the reward model, and samples.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--policy", required=True)
    p.add_argument("--reference", help="reference policy dir (for KL and win-rate)")
    p.add_argument("--reward-model", help="reward model dir")
    p.add_argument("--prompts", help="prompt file (default: the task's eval prompts)")
    p.add_argument("--task", help="task name for its gold reward and eval prompts (e.g. reviews)")
    p.add_argument("--n", type=int, help="evaluate only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for eval.json and samples.jsonl")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ppo_rlhf.app.evaluate import evaluate
    from ppo_rlhf.eval.policy import write_samples

    for path, what in ((args.policy, "--policy"), (args.reference, "--reference"),
                       (args.reward_model, "--reward-model")):
        require_dir(path, what)
    task = None
    if args.task:
        from ppo_rlhf.tasks import get_task

        task = get_task(args.task)
    if args.prompts:
        prompts = load_prompts_arg(args.prompts)
    elif task is not None:
        prompts = task.eval_prompts()
    else:
        raise UsageError("give --prompts FILE or --task NAME")
    if args.n is not None:
        if args.n < 1:
            raise UsageError("--n must be >= 1")
        prompts = prompts[:args.n]
    result, records = evaluate(args.backend, args.policy, prompts, reference=args.reference,
                               reward_model=args.reward_model,
                               gold=None if task is None else task.gold_reward,
                               max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, batch_size=args.batch_size,
                               seed=args.seed)
    print(json.dumps(result.to_dict(), indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result.to_dict(), indent=2))
        write_samples(out / "samples.jsonl", records)
        print(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    add_train_parser(sub)
    add_eval_parser(sub)
