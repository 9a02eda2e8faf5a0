"""`ppo-rlhf train-rm` (reward-model training) and `ppo-rlhf pretrain` (pretraining / SFT).

    ppo-rlhf pretrain --backend jax --out runs/sft                      # demo policy, from scratch
    ppo-rlhf pretrain --backend torch --model ckpt/ --data sft.jsonl --out runs/sft2   # SFT
    ppo-rlhf train-rm --backend jax --model runs/sft --data prefs.jsonl --out runs/rm \
        --epochs 2 --batch-size 32 --max-length 32     # the demo's reward model

Both write a Hugging Face checkpoint dir (+ tokenizer) at --out that loads in either backend and
in `transformers`, with metrics.json (final numbers), metrics.jsonl (one line per step),
train_config.json and checkpoints/. With --lora-rank R the model at --out is a PEFT adapter
(adapter_config.json naming --model as its base + adapter_model.safetensors; a reward model's
also holds its score head and reward_normalisation.json) that every consumer loads (`train
--policy / --reward-model`, `train-rm --model`, `eval`, `sample`), and --merge adds OUT/merged,
the full merged checkpoint. Bad input (a missing dir, a malformed JSONL line, no data)
is a one-line error and exit code 2. Neither backend is imported until the command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ppo_rlhf.app.args import add_lora_args, add_memory_args, add_run_args
from ppo_rlhf.app.backends import BACKENDS, get_backend
from ppo_rlhf.errors import DataError, UsageError
from ppo_rlhf.feedback.labeller import SYNTHETIC_LABELS


def _require_dir(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is not a directory")


def _require_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag} {path!r}: no such file")


def _check_merge(args: argparse.Namespace) -> None:
    if args.merge and not args.lora_rank:
        raise UsageError("--merge writes the LoRA adapters merged into the base: it needs --lora-rank")


def _check_checkpoint_every(n: int) -> None:
    if n < 0:
        raise UsageError(f"--checkpoint-every {n}: must be >= 0 (0 = only at the end)")


def _config(cls: Any, **values: Any) -> Any:
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _check_out(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a directory")
    return path


def _add_optim_args(p: argparse.ArgumentParser, *, lr_default: str, config: str, saved: str) -> None:
    p.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default: {lr_default})")
    p.add_argument("--batch-size", type=int, help="examples per optimiser step")
    p.add_argument("--max-length", type=int, help="tokens per sequence (static shape)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"),
                   help="learning-rate decay after warm-up")
    p.add_argument("--max-grad-norm", type=float, help="global-norm clipping (default: 1.0)")
    p.add_argument("--seed", type=int, help="seed of the batch order (and fresh weights)")
    add_memory_args(p, config=config, models="the model's")
    add_lora_args(p, config=config, roles=None, saved=saved, merged="OUT/merged")
    add_run_args(p, checkpoint_every=0, unit="steps")


# ---- train-rm ------------------------------------------------------------------------------------
def add_train_rm_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-rm", help="train a reward model on preference data",
        description="Reward-model training (seed step 4). --model is a Hugging Face causal-LM "
                    "checkpoint (it gets a fresh score head) or a scalar-head checkpoint, with its "
                    "tokenizer. --data holds pairwise, ranking and/or rating records (JSONL; see "
                    "ppo_rlhf/data/records.py). Without --eval-data a seeded --eval-fraction of the "
                    "prompts is held out, with all their records (so no prompt is both trained on "
                    "and held out). --max-length defaults to 128, or the model's n_positions if "
                    "fewer (GPT-2). Prints the held-out pairwise accuracy; --out gets the reward model "
                    "(scores normalised to mean 0 / std 1 on the training sequences unless "
                    "--no-normalise), metrics.json and metrics.jsonl. With --lora-rank, OUT holds "
                    "the reward model's PEFT adapter (task SEQ_CLS: the adapters, the score head, "
                    "reward_normalisation.json) on --model as its base (a full checkpoint: an "
                    "adapter dir as --model needs no --lora-rank, it is then loaded merged); --merge "
                    "adds OUT/merged, the full reward model.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--model", required=True, metavar="DIR", help="initial model (+ tokenizer)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training preferences")
    p.add_argument("--out", required=True, metavar="DIR", help="output: the reward model + metrics")
    p.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out preferences")
    p.add_argument("--eval-fraction", type=float,
                   help="share of --data's prompts held out (all records of each) when --eval-data "
                        "is absent (default: 0.1)")
    p.add_argument("--loss", choices=("bradley_terry", "plackett_luce", "best_of_k", "rating"),
                   help="default: bradley_terry")
    p.add_argument("--ties", choices=("drop", "keep"), help="tied preferences (default: drop)")
    p.add_argument("--margin-key", metavar="KEY",
                   help="bradley_terry margin from each record's KEY field")
    p.add_argument("--epochs", type=int, help="passes over the data (default: 1)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (0 = all epochs)")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (default: each epoch)")
    p.add_argument("--no-normalise", action="store_true", help="keep reward gain 1 and bias 0")
    p.add_argument("--norm-data", metavar="FILE.jsonl",
                   help="normalise on the responses of these records instead of the training set")
    _add_optim_args(p, lr_default="3e-4", config="RMConfig", saved="OUT")
    p.set_defaults(func=run_train_rm)


def _read_preferences(path: str, flag: str) -> list[Any]:
    from ppo_rlhf.data import read_records

    _require_file(path, flag)
    try:
        return list(read_records(path))
    except DataError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: {e}") from None


def run_train_rm(args: argparse.Namespace) -> int:
    from ppo_rlhf.config import RMConfig
    from ppo_rlhf.data.encoding import reference_sequences
    from ppo_rlhf.lora import require_full_base
    from ppo_rlhf.runtime.split import group_key, grouped_holdout_split

    _require_dir(args.model, "--model")
    out = _check_out(args.out)
    _check_checkpoint_every(args.checkpoint_every)
    _check_merge(args)
    max_length = args.max_length
    if max_length is None:  # the default, cut to what the model can take (GPT-2: n_positions)
        max_length = _positions_limit(args.model, RMConfig.max_length)
    config = _config(RMConfig, learning_rate=args.lr, num_epochs=args.epochs,
                     batch_size=args.batch_size, max_length=max_length, seed=args.seed,
                     weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                     lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm,
                     loss=args.loss, ties=args.ties, margin_key=args.margin_key,
                     eval_fraction=args.eval_fraction, eval_every=args.eval_every,
                     max_steps=args.max_steps, normalise=False if args.no_normalise else None,
                     remat=args.remat, compute_dtype=args.compute_dtype,
                     scan_unroll=args.scan_unroll, lora_rank=args.lora_rank,
                     lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_base_dtype=args.lora_base_dtype,
                     lora_targets=args.lora_targets)
    require_full_base(args.model, "--model", config.lora_rank > 0)
    records = _read_preferences(args.data, "--data")
    if args.eval_data is not None:
        eval_records = _read_preferences(args.eval_data, "--eval-data")
        train_records = records
    else:
        train_idx, eval_idx, _ = grouped_holdout_split([group_key(r) for r in records],
                                                       config.eval_fraction, config.seed)
        train_records = [records[i] for i in train_idx]
        eval_records = [records[i] for i in eval_idx] or None
    reference = None
    if args.norm_data is not None:
        reference = reference_sequences(_read_preferences(args.norm_data, "--norm-data"))
    rm = get_backend(args.backend)
    try:
        trainer = rm.RewardModelTrainer(args.model, config, out_dir=out,
                                        checkpoint_every=args.checkpoint_every)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {args.model!r}: {e}") from None
    m = trainer.fit(train_records, eval_records, reference=reference,
                    progress=not args.no_progress, resume=args.resume, report_to=args.report_to,
                    label_quality=SYNTHETIC_LABELS)  # None for records it did not write
    if not m.get("stopped") and args.merge:
        trainer.save_model(out / "merged", merge=True)
        print(f"merged reward model -> {out / 'merged'}")
    if not m.get("stopped"):  # a signal: checkpoint written, the loop said so
        groups = len({group_key(r) for r in eval_records}) if eval_records else 0
        _print_rm_summary(m, out, groups)
    return 0


def _positions_limit(model: str, default: int) -> int:
    """`default`, or less for a model with learned positions (GPT-2) that has fewer."""
    try:
        c = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return default  # the trainer reports a missing or bad config
    limit = c.get("n_positions") if isinstance(c, dict) and c.get("model_type") == "gpt2" else None
    if isinstance(limit, int) and 2 <= limit < default:
        print(f"--max-length {limit} (the model's n_positions; default {default})", flush=True)
        return limit
    return default


def _print_rm_summary(m: dict[str, Any], out: Path, groups: int) -> None:
    if m["eval_accuracy"] is None:
        print(f"no held-out data (eval_fraction=0 and no --eval-data); train accuracy "
              f"{m['train_accuracy']:.4f}")
    else:
        ceiling = m.get("noise_ceiling")
        extra = f" (labeller noise ceiling {ceiling:.4f})" if ceiling is not None else ""
        if m.get("eval_expected_accuracy") is not None:
            extra += f"; expected over the label noise {m['eval_expected_accuracy']:.4f}"
        print(f"held-out pairwise accuracy: {m['eval_accuracy']:.4f} on {m['eval_pairs']} pairs "
              f"({groups} prompts){extra}; train accuracy {m['train_accuracy']:.4f}")
    print(f"reward model -> {out} (reward_gain {m['reward_gain']:.4g}, reward_bias "
          f"{m['reward_bias']:.4g}); metrics -> {out / 'metrics.json'}")


# ---- pretrain ------------------------------------------------------------------------------------
def add_pretrain_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain the demo policy, or fine-tune (SFT) a checkpoint",
        description="Causal-LM training (seed step 1). Without --model: a fresh GPT-2-style model "
                    "(the task's demo_model_config, --model-size) pretrained on the task corpus "
                    "(loss on every token). With --model DIR: supervised fine-tuning of that "
                    "checkpoint on --data (JSONL lines {\"prompt\", \"response\"} -- loss on the "
                    "response -- or {\"text\"}; or a .txt file, one text per line) or on the task "
                    "corpus as prompt/response pairs. Afterwards, with a task, samples responses to "
                    "the task's eval prompts (temperature 0.7) and reports their mean gold reward. "
                    "With --lora-rank (needs --model: the adapter's base), OUT holds the PEFT "
                    "adapter of the causal LM; --merge adds OUT/merged, the full merged checkpoint.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--out", required=True, metavar="DIR", help="output: the model + tokenizer + metrics")
    p.add_argument("--task", default="reviews", help="task (corpus, tokenizer, gold reward; default: reviews)")
    p.add_argument("--model", metavar="DIR", help="checkpoint to fine-tune (default: a fresh model)")
    p.add_argument("--data", metavar="FILE", help="training examples (default: the task corpus)")
    p.add_argument("--eval-data", metavar="FILE", help="held-out examples for the eval loss")
    p.add_argument("--eval-fraction", type=float, default=0.0, metavar="F",
                   help="without --eval-data: hold out this share of --data's prompts, with all "
                        "their examples, for the eval loss (a {\"text\"} example is its own "
                        "group; default: 0, none)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: 1000)")
    p.add_argument("--model-size", choices=("tiny", "small"), default="small",
                   help="fresh model size (default: small, ~0.8M parameters)")
    p.add_argument("--corpus-size", type=int, default=20000,
                   help="task-corpus examples to generate (default: 20000)")
    p.add_argument("--eval-samples", type=int, default=240,
                   help="responses sampled on the task's eval prompts for the gold score "
                        "(default: 240; 0 = skip)")
    _add_optim_args(p, lr_default="1e-3 from scratch, 1e-4 with --model", config="SFTConfig", saved="OUT")
    p.set_defaults(func=run_pretrain)


def read_examples(path: str, flag: str) -> list[Any]:
    """Examples of a JSONL file ({"text"} or {"prompt", "response"} per line) or of a text file
    (one example per non-blank line); DataError at path:line for a bad line."""
    from ppo_rlhf.data import iter_jsonl

    _require_file(path, flag)
    out: list[Any] = []
    if not str(path).lower().endswith((".jsonl", ".json", ".ndjson")):
        with open(path, encoding="utf-8") as f:
            out = [line.rstrip("\r\n") for line in f if line.strip()]
    else:
        for lineno, obj in iter_jsonl(path):
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(obj["text"])
            elif (isinstance(obj, dict) and isinstance(obj.get("prompt"), str)
                  and isinstance(obj.get("response"), str)):
                out.append((obj["prompt"], obj["response"]))
            else:
                raise DataError('expected {"text": str} or {"prompt": str, "response": str}',
                                path=path, line=lineno)
    if not out:
        raise DataError("no examples in the file", path=path)
    return out


def run_pretrain(args: argparse.Namespace) -> int:
    from ppo_rlhf.app.pipelines import pretrain_model
    from ppo_rlhf.tasks import get_task

    _require_dir(args.model, "--model")
    out = _check_out(args.out)
    task = get_task(args.task) if args.task else None
    if args.steps is not None and args.steps < 0:
        raise UsageError(f"--steps {args.steps}: must be >= 0")
    if args.eval_samples < 0:
        raise UsageError(f"--eval-samples {args.eval_samples}: must be >= 0 (0 = skip)")
    _check_checkpoint_every(args.checkpoint_every)
    _check_merge(args)
    if args.lora_rank and args.model is None:
        raise UsageError("--lora-rank needs --model: the adapter's base checkpoint (a fresh model has "
                         "none on disk)")
    if args.lora_rank:
        from ppo_rlhf.lora import require_full_base

        require_full_base(args.model, "--model", True)
    if args.data is None and task is None:
        raise UsageError("no data: pass --data FILE or --task")
    train = read_examples(args.data, "--data") if args.data is not None else None
    eval_ex = read_examples(args.eval_data, "--eval-data") if args.eval_data is not None else None
    if not 0.0 <= args.eval_fraction <= 0.9:
        raise UsageError(f"--eval-fraction {args.eval_fraction}: must be in [0, 0.9]")
    if args.eval_fraction > 0:
        if train is None or eval_ex is not None:
            raise UsageError("--eval-fraction splits --data: give it with --data and without "
                             "--eval-data")
        from ppo_rlhf.runtime.split import grouped_holdout_split

        # the group of a (prompt, response) example is its prompt; a plain text is its own
        keys = [x[0] if isinstance(x, tuple) else x for x in train]
        train_idx, eval_idx, groups = grouped_holdout_split(keys, args.eval_fraction, args.seed or 0)
        train, eval_ex = [train[i] for i in train_idx], [train[i] for i in eval_idx]
        print(f"held out {len(eval_ex)} of {len(train) + len(eval_ex)} examples ({groups} prompts) "
              f"for the eval loss", flush=True)
    overrides = dict(num_steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                     max_length=args.max_length, learning_rate=args.lr,
                     warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                     lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm,
                     remat=args.remat, compute_dtype=args.compute_dtype,
                     scan_unroll=args.scan_unroll, lora_rank=args.lora_rank,
                     lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     lora_base_dtype=args.lora_base_dtype,
                     lora_targets=args.lora_targets)
    m = pretrain_model(args.backend, out, task=task, model=args.model, train=train, eval=eval_ex,
                       config={k: v for k, v in overrides.items() if v is not None},
                       model_size=args.model_size, corpus_size=args.corpus_size,
                       eval_samples=args.eval_samples, progress=not args.no_progress,
                       resume=args.resume, checkpoint_every=args.checkpoint_every,
                       report_to=args.report_to, merge=args.merge)
    if m.get("stopped"):
        return 0
    n_params = _num_params(out)
    print(f"{m['steps']} steps in {m['time_s']:.1f} s ({args.backend}, {n_params:,} parameters): "
          f"final loss {m['final_loss']:.4f}"
          + (f", eval loss {m['eval_loss']:.4f}" if m.get("eval_loss") is not None else ""))
    if "gold_mean" in m:
        print(f"samples on {task.name} eval prompts (T=0.7): mean gold {m['gold_mean']:.3f}, "
              f"{100 * m['gold_positive_frac']:.0f}% positive, "
              f"{100 * m['gold_well_formed_frac']:.0f}% fully well formed")
    print(f"model -> {out}" + (" (PEFT adapter)" if args.lora_rank else "")
          + (f"; merged -> {out / 'merged'}" if args.merge else "") + f"; metrics -> {out / 'metrics.json'}")
    return 0


def _num_params(path: Path) -> int:
    """The parameters of the model at `path` (an adapter dir: its base's)."""
    from ppo_rlhf.hf_checkpoint import load_tensors
    from ppo_rlhf.lora import adapter_base

    try:
        return int(sum(v.size for v in load_tensors(adapter_base(path) or path).values()))
    except (OSError, ValueError):
        return 0


def add_parser(sub: Any) -> None:
    """Both sub-commands (for a registry entry without a function name)."""
    add_train_rm_parser(sub)
    add_pretrain_parser(sub)


__all__ = ["add_train_rm_parser", "add_pretrain_parser", "add_parser", "run_train_rm",
           "run_pretrain", "read_examples"]
