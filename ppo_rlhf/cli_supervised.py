"""`ppo-rlhf train-rm` (reward-model training) and `ppo-rlhf pretrain` (pretraining / SFT).

    ppo-rlhf pretrain --backend jax --out runs/sft                      # demo policy, from scratch
    ppo-rlhf pretrain --backend torch --model ckpt/ --data sft.jsonl --out runs/sft2   # SFT
    ppo-rlhf train-rm --backend jax --model runs/sft --data prefs.jsonl --out runs/rm \
        --epochs 2 --batch-size 32 --max-length 32     # the demo's reward model

Both write a Hugging Face checkpoint dir (+ tokenizer) at --out that loads in either backend and
in `transformers`, with metrics.json (final numbers), metrics.jsonl (one line per step),
train_config.json and checkpoints/. Bad input (a missing dir, a malformed JSONL line, no data)
is a one-line error and exit code 2. Neither backend is imported until the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from ppo_rlhf.backends import BACKENDS, backend_module
from ppo_rlhf.errors import DataError, UsageError




def _require_dir(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is not a directory")


def _require_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag} {path!r}: no such file")


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


def _add_optim_args(p: argparse.ArgumentParser, *, lr_default: str) -> None:
    p.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default: {lr_default})")
    p.add_argument("--batch-size", type=int, help="examples per optimiser step")
    p.add_argument("--max-length", type=int, help="tokens per sequence (static shape)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    p.add_argument("--lr-schedule", choices=("constant", "linear", "cosine"),
                   help="learning-rate decay after warm-up")
    p.add_argument("--max-grad-norm", type=float, help="global-norm clipping (default: 1.0)")
    p.add_argument("--seed", type=int, help="seed of the batch order (and fresh weights)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="atomic checkpoint every N steps (and at the end); 0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- train-rm ------------------------------------------------------------------------------------
def add_train_rm_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train-rm", help="train a reward model on preference data",
        description="Reward-model training (seed step 4). --model is a Hugging Face causal-LM "
                    "checkpoint (it gets a fresh score head) or a scalar-head checkpoint, with its "
                    "tokenizer. --data holds pairwise, ranking and/or rating records (JSONL; see "
                    "ppo_rlhf/data.py). Without --eval-data a seeded --eval-fraction of the records "
                    "is held out. Prints the held-out pairwise accuracy; --out gets the reward model "
                    "(scores normalised to mean 0 / std 1 on the training sequences unless "
                    "--no-normalise), metrics.json and metrics.jsonl.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--model", required=True, metavar="DIR", help="initial model (+ tokenizer)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training preferences")
    p.add_argument("--out", required=True, metavar="DIR", help="output: the reward model + metrics")
    p.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out preferences")
    p.add_argument("--eval-fraction", type=float,
                   help="share of --data held out when --eval-data is absent (default: 0.1)")
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
    _add_optim_args(p, lr_default="3e-4")
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
    from ppo_rlhf.supervised import RMConfig, holdout_split, reference_sequences

    _require_dir(args.model, "--model")
    out = _check_out(args.out)
    _check_checkpoint_every(args.checkpoint_every)
    config = _config(RMConfig, learning_rate=args.lr, num_epochs=args.epochs,
                     batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                     weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                     lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm,
                     loss=args.loss, ties=args.ties, margin_key=args.margin_key,
                     eval_fraction=args.eval_fraction, eval_every=args.eval_every,
                     max_steps=args.max_steps, normalise=False if args.no_normalise else None)
    records = _read_preferences(args.data, "--data")
    if args.eval_data is not None:
        eval_records = _read_preferences(args.eval_data, "--eval-data")
        train_records = records
    else:
        train_idx, eval_idx = holdout_split(len(records), config.eval_fraction, config.seed)
        train_records = [records[i] for i in train_idx]
        eval_records = [records[i] for i in eval_idx] or None
    reference = None
    if args.norm_data is not None:
        reference = reference_sequences(_read_preferences(args.norm_data, "--norm-data"))
    rm = backend_module(args.backend, "reward_model")
    try:
        trainer = rm.RewardModelTrainer(args.model, config, out_dir=out,
                                        checkpoint_every=args.checkpoint_every)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model {args.model!r}: {e}") from None
    m = trainer.fit(train_records, eval_records, reference=reference,
                    progress=not args.no_progress, resume=args.resume)
    _print_rm_summary(m, out)
    return 0


def _print_rm_summary(m: dict[str, Any], out: Path) -> None:
    if m["eval_accuracy"] is None:
        print(f"no held-out data (eval_fraction=0 and no --eval-data); train accuracy "
              f"{m['train_accuracy']:.4f}")
    else:
        ceiling = m.get("noise_ceiling")
        extra = f" (labeller noise ceiling {ceiling:.4f})" if ceiling is not None else ""
        if m.get("eval_expected_accuracy") is not None:
            extra += f"; expected over the label noise {m['eval_expected_accuracy']:.4f}"
        print(f"held-out pairwise accuracy: {m['eval_accuracy']:.4f} on {m['eval_pairs']} pairs"
              f"{extra}; train accuracy {m['train_accuracy']:.4f}")
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
                    "the task's eval prompts (temperature 0.7) and reports their mean gold reward.")
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--out", required=True, metavar="DIR", help="output: the model + tokenizer + metrics")
    p.add_argument("--task", default="reviews", help="task (corpus, tokenizer, gold reward; default: reviews)")
    p.add_argument("--model", metavar="DIR", help="checkpoint to fine-tune (default: a fresh model)")
    p.add_argument("--data", metavar="FILE", help="training examples (default: the task corpus)")
    p.add_argument("--eval-data", metavar="FILE", help="held-out examples for the eval loss")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (default: 1000)")
    p.add_argument("--model-size", choices=("tiny", "small"), default="small",
                   help="fresh model size (default: small, ~0.8M parameters)")
    p.add_argument("--corpus-size", type=int, default=20000,
                   help="task-corpus examples to generate (default: 20000)")
    p.add_argument("--eval-samples", type=int, default=240,
                   help="responses sampled on the task's eval prompts for the gold score "
                        "(default: 240; 0 = skip)")
    _add_optim_args(p, lr_default="1e-3 from scratch, 1e-4 with --model")
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


def _demo_config(task: Any, size: str, vocab_size: int) -> dict[str, Any]:
    module = importlib.import_module(task.build_tokenizer.__module__)
    make = getattr(module, "demo_model_config", None)
    if make is None:
        raise UsageError(f"task {task.name!r} defines no demo_model_config; pass --model DIR")
    return make(size, vocab_size=vocab_size)


def run_pretrain(args: argparse.Namespace) -> int:
    from ppo_rlhf.tasks import get_task

    _require_dir(args.model, "--model")
    out = _check_out(args.out)
    task = get_task(args.task) if args.task else None
    if args.steps is not None and args.steps < 0:
        raise UsageError(f"--steps {args.steps}: must be >= 0")
    if args.eval_samples < 0:
        raise UsageError(f"--eval-samples {args.eval_samples}: must be >= 0 (0 = skip)")
    _check_checkpoint_every(args.checkpoint_every)
    if args.data is None and task is None:
        raise UsageError("no data: pass --data FILE or --task")
    train = read_examples(args.data, "--data") if args.data is not None else None
    eval_ex = read_examples(args.eval_data, "--eval-data") if args.eval_data is not None else None
    m = pretrain_model(args.backend, out, task=task, model=args.model, train=train, eval=eval_ex,
                       steps=args.steps, model_size=args.model_size, corpus_size=args.corpus_size,
                       seed=args.seed, eval_samples=args.eval_samples, progress=not args.no_progress,
                       resume=args.resume, checkpoint_every=args.checkpoint_every,
                       batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm)
    n_params = _num_params(out)
    print(f"{m['steps']} steps in {m['time_s']:.1f} s ({args.backend}, {n_params:,} parameters): "
          f"final loss {m['final_loss']:.4f}"
          + (f", eval loss {m['eval_loss']:.4f}" if m.get("eval_loss") is not None else ""))
    if "gold_mean" in m:
        print(f"samples on {task.name} eval prompts (T=0.7): mean gold {m['gold_mean']:.3f}, "
              f"{100 * m['gold_positive_frac']:.0f}% positive, "
              f"{100 * m['gold_well_formed_frac']:.0f}% fully well formed")
    print(f"model -> {out}; metrics -> {out / 'metrics.json'}")
    return 0


def pretrain_model(backend: str, out: Path, *, task: Any = None, model: str | None = None,
                   train: list | None = None, eval: list | None = None, steps: int = 1000,
                   model_size: str = "small", corpus_size: int = 20000, seed: int | None = None,
                   eval_samples: int = 240, progress: bool = True, resume: bool = False,
                   checkpoint_every: int = 0, batch_size: int | None = None,
                   max_length: int | None = None, lr: float | None = None,
                   warmup_steps: int | None = None, weight_decay: float | None = None,
                   lr_schedule: str | None = None, max_grad_norm: float | None = None) -> dict[str, Any]:
    """Pretrain a fresh demo model of `task` (model=None) or fine-tune `model` (a checkpoint dir)
    on `train` (default: the task corpus); save it with its tokenizer to `out`. With a task and
    eval_samples > 0, also sample the task's eval prompts and report the gold score. Returns the
    metrics (as written to out/metrics.json). `task`: a Task or its name. `ppo-rlhf pretrain`
    and the demo call this."""
    import tempfile

    from ppo_rlhf.supervised import SFTConfig, _jsonable, load_tokenizer_dir, write_fresh_checkpoint

    if isinstance(task, str):
        from ppo_rlhf.tasks import get_task

        task = get_task(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_ = 0 if seed is None else seed
    default_len = 32 if task is None else task.max_prompt_tokens + task.max_response_tokens + 2
    config = _config(SFTConfig, num_steps=steps, seed=seed, batch_size=batch_size,
                     max_length=max_length or default_len,
                     learning_rate=lr if lr is not None else (1e-4 if model else 1e-3),
                     warmup_steps=warmup_steps if warmup_steps is not None else (
                         0 if model else min(50, steps // 10)),
                     weight_decay=weight_decay, lr_schedule=lr_schedule,
                     max_grad_norm=max_grad_norm)
    if train is None:  # the task corpus (+ the next 500 examples of it as the eval set)
        if task is None:
            raise UsageError("no data: pass --data FILE or --task")
        if corpus_size < 1:
            raise UsageError(f"--corpus-size {corpus_size}: must be >= 1")
        corpus = task.generate_corpus(corpus_size + 500, seed=seed_)
        # from scratch: plain text, loss on every token; SFT: pairs, loss on the response
        as_example = (lambda pr: pr) if model else (lambda pr: f"{pr[0]} {pr[1]}")
        train = [as_example(x) for x in corpus[:corpus_size]]
        eval = eval or [as_example(x) for x in corpus[corpus_size:]]

    sft = backend_module(backend, "sft")
    with tempfile.TemporaryDirectory() as tmp:
        if model:
            model_dir, tokenizer = model, load_tokenizer_dir(model)
        else:
            task.build_tokenizer(Path(tmp) / "tokenizer")
            tokenizer = load_tokenizer_dir(Path(tmp) / "tokenizer")
            hf_config = _demo_config(task, model_size, len(tokenizer))
            model_dir = write_fresh_checkpoint(Path(tmp) / "init", hf_config, seed=seed_,
                                               tokenizer=tokenizer)
        try:
            trainer = sft.SFTTrainer(str(model_dir), config, tokenizer=tokenizer, out_dir=out,
                                     checkpoint_every=checkpoint_every)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model {model!r}: {e}") from None
        m = trainer.fit(train, eval, progress=progress, resume=resume)
    if task is not None and eval_samples > 0:
        m.update(gold_of_samples(sft, trainer.model(), tokenizer, task, n=eval_samples,
                                 seed=seed_, out=out))
        (out / "metrics.json").write_text(json.dumps(_jsonable(m), indent=2, sort_keys=True) + "\n")
    return m


def gold_of_samples(sft: Any, model: Any, tokenizer: Any, task: Any, *, n: int, seed: int,
                    out: Path | None = None, temperature: float = 0.7) -> dict[str, float]:
    """Sample n responses (cycling over task.eval_prompts()) at `temperature` with the backend
    module `sft`'s `sample_responses` and score them with the task's gold reward: gold_mean,
    gold_positive_frac (share with gold > 0) and gold_well_formed_frac (`_well_formed_frac`).
    Writes out/samples.jsonl (prompt, response, gold) when `out` is given."""
    import numpy as np

    prompts = [task.eval_prompts()[i % len(task.eval_prompts())] for i in range(n)]
    responses = sft.sample_responses(model, tokenizer, prompts, max_new_tokens=task.max_response_tokens,
                                     temperature=temperature, seed=seed,
                                     max_prompt_len=task.max_prompt_tokens)
    gold = np.asarray(task.gold_reward(prompts, responses), np.float64)
    if out is not None:
        with open(Path(out) / "samples.jsonl", "w", encoding="utf-8") as f:
            for p, r, g in zip(prompts, responses, gold):
                f.write(json.dumps({"prompt": p, "response": r, "gold": float(g)}) + "\n")
    return {"gold_mean": float(gold.mean()), "gold_positive_frac": float((gold > 0).mean()),
            "gold_well_formed_frac": float(_well_formed_frac(task, prompts, responses)),
            "gold_samples": int(n), "sample_temperature": temperature}


def _well_formed_frac(task: Any, prompts: list[str], responses: list[str]) -> float:
    """Share of responses all of whose sentences are well formed (the task's gold_details f == 1,
    when the task module has gold_details; else the share with gold > -1)."""
    module = importlib.import_module(task.gold_reward.__module__)
    details = getattr(module, "gold_details", None)
    if details is None:
        gold = task.gold_reward(prompts, responses)
        return sum(g > -1 for g in gold) / len(gold)
    return sum(details(p, r)["f"] == 1.0 for p, r in zip(prompts, responses)) / len(prompts)


def _num_params(path: Path) -> int:
    from ppo_rlhf.hf_checkpoint import load_tensors

    try:
        return int(sum(v.size for v in load_tensors(path).values()))
    except (OSError, ValueError):
        return 0


def add_parser(sub: Any) -> None:
    """Both sub-commands (for a registry entry without a function name)."""
    add_train_rm_parser(sub)
    add_pretrain_parser(sub)


__all__ = ["add_train_rm_parser", "add_pretrain_parser", "add_parser", "run_train_rm",
           "run_pretrain", "pretrain_model", "read_examples", "gold_of_samples"]
