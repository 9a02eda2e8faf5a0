"""`ppo-rlhf label`: the terminal labelling tool's command line (`ppo_rlhf.feedback.terminal` is
the tool)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ppo_rlhf.app.backends import BACKENDS, load_policy_sampler
from ppo_rlhf.data import load_prompts
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.samplers import ResponseSampler, ResponsesFileSampler
from ppo_rlhf.feedback.terminal import MODES, check_mode, run_labelling


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "label", help="label responses by hand (choose / rank / rate) into a JSONL file",
        description="Collect human feedback in the terminal: K responses per prompt, shown\n"
                    "numbered; type your choice, ranking or ratings. Answers are saved as they\n"
                    "are given; rerun the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="modes: choose (K=2, pick the better), rank (order K), rate (1..N each).\n"
               "formats: see ppo_rlhf/data/__init__.py and ppo_rlhf/feedback/terminal.py.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", metavar="DIR", help="sample responses from this policy")
    src.add_argument("--responses", metavar="FILE",
                     help='pre-generated responses: JSONL of {"prompt", "responses": [...]}')
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts (JSONL or plain text, one per line); required with --policy; "
                        "with --responses, defaults to that file's prompts")
    p.add_argument("--out", metavar="FILE.jsonl", required=True,
                   help="labels are appended here (skips go to FILE.skipped.jsonl)")
    p.add_argument("--backend", choices=BACKENDS, default="jax",
                   help="generation backend for --policy (default: jax)")
    p.add_argument("--mode", choices=MODES, default="choose", help="default: choose")
    p.add_argument("--k", type=int, default=2, help="responses per prompt (default: 2)")
    p.add_argument("--scale", type=int, default=7, metavar="N", help="rate mode: ratings 1..N (default: 7)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="--policy: response length limit (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="--policy: sampling temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling and of the display order (default: 0)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="show responses in the sampler's order instead of a shuffled one")
    p.add_argument("--redo-skipped", action="store_true",
                   help="ask again the prompts skipped in earlier sessions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_mode(args.mode, args.k, args.scale)
    if args.policy is not None:
        if args.prompts is None:
            raise UsageError("--policy needs --prompts FILE")
        if not Path(args.policy).is_dir():
            raise UsageError(f"--policy {args.policy}: not a directory")
        prompts = load_prompts(args.prompts)
        sampler: ResponseSampler = load_policy_sampler(
            args.backend, args.policy, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, seed=args.seed)
    else:
        file_sampler = ResponsesFileSampler(args.responses)
        prompts = load_prompts(args.prompts) if args.prompts else file_sampler.prompts
        missing = [p for p in prompts if p not in file_sampler.responses]
        if missing:
            raise UsageError(f"{args.responses} has no responses for {len(missing)} of the "
                             f"prompts, e.g. {missing[0]!r}")
        few = [p for p in prompts if len(file_sampler.responses[p]) < args.k]
        if few:
            raise UsageError(f"{args.responses}: {len(few)} prompts have fewer than --k "
                             f"{args.k} responses, e.g. {few[0]!r}")
        sampler = file_sampler
    run_labelling(prompts, sampler, args.out, mode=args.mode, k=args.k, scale=args.scale,
                  shuffle=not args.no_shuffle, seed=args.seed, redo_skipped=args.redo_skipped)
    return 0
