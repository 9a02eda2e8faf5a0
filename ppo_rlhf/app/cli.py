"""The `ppo-rlhf` command line (also `python -m ppo_rlhf`).

Each subcommand is registered in `SUBCOMMANDS` as (name, "module[:function]", help): the function
(default `add_parser`) adds the sub-parser(s) and sets `func` to the code that runs it. These
modules import neither backend at module level -- a command imports JAX or PyTorch only when it
runs -- so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Sequence

from ppo_rlhf import __version__
from ppo_rlhf.app import backends
from ppo_rlhf.errors import UsageError

# (name, "module[:function]", one-line help); function(sub) (default add_parser) must create the
# sub-parser `name`. A module:function shared by several names is called once.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("demo", "ppo_rlhf.app.demo", "the whole RLHF loop on the built-in task"),
    ("pretrain", "ppo_rlhf.app.supervised:add_pretrain_parser", "pretrain / SFT a policy"),
    ("label", "ppo_rlhf.app.label", "label responses by hand (choose / rank / rate)"),
    ("annotate", "ppo_rlhf.app.annotate", "label in browsers, as a team (web app)"),
    ("train", "ppo_rlhf.app.train:add_train_parser", "PPO fine-tuning against a reward"),
    ("eval", "ppo_rlhf.app.train:add_eval_parser", "evaluate a policy"),
    ("train-rm", "ppo_rlhf.app.supervised:add_train_rm_parser", "train a reward model"),
    ("plan", "ppo_rlhf.app.plan", "compile one iteration for a TPU topology: memory per chip, fits or not"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppo-rlhf",
        description="PPO-based RLHF for language models, in JAX/Flax and in PyTorch.",
        epilog="Run `ppo-rlhf COMMAND --help` for a command's options. With --backend jax, "
               "compiled programs are kept in ~/.cache/ppo-rlhf/jax for the next run "
               "(PPO_RLHF_COMPILE_CACHE=off turns that off, =DIR moves it).",
    )
    parser.add_argument("--version", action="version", version=f"ppo-rlhf {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    done: set[str] = set()
    for _name, spec, _help in SUBCOMMANDS:
        if spec in done:
            continue
        done.add(spec)
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function or "add_parser")(sub)
    return parser


def _one_line_warning(command: str):
    """A `warnings.formatwarning` that prints `ppo-rlhf COMMAND: warning: MESSAGE` on one line."""
    def format_warning(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"ppo-rlhf {command}: warning: {kind}{message}\n"

    return format_warning


def main(argv: Sequence[str] | None = None) -> int:
    backends.skip_absent_accelerators()  # libtpu without a TPU: JAX on the other platforms, quietly
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    format_warning = warnings.formatwarning
    if not args.debug:  # warnings as one line each, like errors (--debug: Python's own format)
        warnings.formatwarning = _one_line_warning(args.command)
    try:
        # JAX runs keep their compiled programs on disk for the next run
        # (ppo_rlhf.runtime.compile_cache; PPO_RLHF_COMPILE_CACHE=off|DIR)
        backends.use_compile_cache()
        return int(args.func(args) or 0)
    except UsageError as e:
        if args.debug:
            raise
        print(f"ppo-rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ppo-rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug shows everything
        if args.debug:
            raise
        print(f"ppo-rlhf {args.command}: error: {type(e).__name__}: {e} (rerun with --debug for "
              f"the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
