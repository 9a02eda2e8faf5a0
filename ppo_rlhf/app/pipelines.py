"""Pipelines: the multi-step recipes the demo, the CLI and the benchmarks share -- one backend
picked, several library steps in a row.

    m = pretrain_model("jax", "runs/sft", task="reviews", config={"num_steps": 600})
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ppo_rlhf.app.backends import get_backend
from ppo_rlhf.config import SFTConfig
from ppo_rlhf.errors import UsageError
from ppo_rlhf.hf_checkpoint import write_fresh_checkpoint
from ppo_rlhf.runtime.metrics import jsonable
from ppo_rlhf.tokens import load_tokenizer


def pretrain_model(backend: str, out: str | Path, *, task: Any = None, model: str | None = None,
                   train: list | None = None, eval: list | None = None,
                   config: Mapping[str, Any] | None = None, model_size: str = "small",
                   corpus_size: int = 20000, eval_samples: int = 240, progress: bool = True,
                   resume: bool = False, checkpoint_every: int = 0,
                   report_to: str = "none", merge: bool = False) -> dict[str, Any]:
    """Pretrain a fresh demo model of `task` (model=None) or fine-tune `model` (a checkpoint dir)
    on `train` (default: the task corpus); save it with its tokenizer to `out`. `config`:
    SFTConfig fields that differ from the defaults here (from scratch: 1000 steps, lr 1e-3, a
    short warm-up; fine-tuning: lr 1e-4; max_length fits the task's prompt + response). With a
    task and eval_samples > 0, also sample the task's eval prompts and report the gold score.
    Returns the metrics (as written to out/metrics.json). `task`: a Task or its name. With LoRA
    (config lora_rank > 0; needs `model`, the adapter's base) `out` holds the PEFT adapter, and
    merge=True also writes out/merged, the full merged checkpoint."""
    if isinstance(task, str):
        from ppo_rlhf.tasks import get_task

        task = get_task(task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    values = dict(config or {})
    seed = int(values.get("seed", 0))
    steps = int(values.get("num_steps", 1000))
    defaults = dict(num_steps=steps, learning_rate=1e-4 if model else 1e-3,
                    warmup_steps=0 if model else min(50, steps // 10),
                    max_length=32 if task is None else task.max_prompt_tokens + task.max_response_tokens + 2)
    try:
        cfg = SFTConfig(**{**defaults, **values})
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if cfg.lora_rank and not model:
        raise UsageError("LoRA pretraining needs a model checkpoint (--model): the adapter's base")
    if train is None:  # the task corpus (+ the next 500 examples of it as the eval set)
        if task is None:
            raise UsageError("no data: pass --data FILE or --task")
        if corpus_size < 1:
            raise UsageError(f"--corpus-size {corpus_size}: must be >= 1")
        corpus = task.generate_corpus(corpus_size + 500, seed=seed)
        # from scratch: plain text, loss on every token; SFT: pairs, loss on the response
        as_example = (lambda pr: pr) if model else (lambda pr: f"{pr[0]} {pr[1]}")
        train = [as_example(x) for x in corpus[:corpus_size]]
        eval = eval or [as_example(x) for x in corpus[corpus_size:]]

    core = get_backend(backend)
    with tempfile.TemporaryDirectory() as tmp:
        if model:
            model_dir, tokenizer = model, load_tokenizer(model)
        else:
            task.build_tokenizer(Path(tmp) / "tokenizer")
            tokenizer = load_tokenizer(Path(tmp) / "tokenizer")
            hf_config = _demo_config(task, model_size, len(tokenizer))
            model_dir = write_fresh_checkpoint(Path(tmp) / "init", hf_config, seed=seed,
                                               tokenizer=tokenizer)
        try:
            trainer = core.SFTTrainer(str(model_dir), cfg, tokenizer=tokenizer, out_dir=out,
                                     checkpoint_every=checkpoint_every)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model {model!r}: {e}") from None
        m = trainer.fit(train, eval, progress=progress, resume=resume, report_to=report_to)
        if merge and cfg.lora_rank and not m.get("stopped"):
            trainer.save_model(out / "merged", merge=True)
    if task is not None and eval_samples > 0 and not m.get("stopped"):
        m.update(gold_of_samples(backend, trainer.model(), tokenizer, task, n=eval_samples,
                                 seed=seed, out=out))
        (out / "metrics.json").write_text(json.dumps(jsonable(m), indent=2, sort_keys=True) + "\n")
    return m


def _demo_config(task: Any, size: str, vocab_size: int) -> dict[str, Any]:
    if task.demo_model_config is None:
        raise UsageError(f"task {task.name!r} defines no demo_model_config; pass --model DIR")
    return task.demo_model_config(size, vocab_size=vocab_size)


def gold_of_samples(backend: str, model: Any, tokenizer: Any, task: Any, *, n: int, seed: int,
                    out: Path | None = None, temperature: float = 0.7) -> dict[str, float]:
    """Sample n responses (cycling over task.eval_prompts()) at `temperature` with the backend's
    `sample_texts` and score them with the task's gold reward: gold_mean,
    gold_positive_frac (share with gold > 0) and gold_well_formed_frac (`_well_formed_frac`).
    Writes out/samples.jsonl (prompt, response, gold) when `out` is given."""
    prompts = [task.eval_prompts()[i % len(task.eval_prompts())] for i in range(n)]
    responses = get_backend(backend).sample_texts(
        model, tokenizer, prompts, max_new_tokens=task.max_response_tokens, temperature=temperature,
        seed=seed, max_prompt_len=task.max_prompt_tokens, batch_size=64).texts
    gold = np.asarray(task.gold_reward(prompts, responses), np.float64)
    if out is not None:
        with open(Path(out) / "samples.jsonl", "w", encoding="utf-8") as f:
            for p, r, g in zip(prompts, responses, gold):
                f.write(json.dumps({"prompt": p, "response": r, "gold": float(g)}) + "\n")
    return {"gold_mean": float(gold.mean()), "gold_positive_frac": float((gold > 0).mean()),
            "gold_well_formed_frac": float(_well_formed_frac(task, prompts, responses)),
            "gold_samples": int(n), "sample_temperature": temperature}


def _well_formed_frac(task: Any, prompts: list[str], responses: list[str]) -> float:
    """Share of well-formed responses: the task's `well_formed` when it has one, else the share
    with gold > -1."""
    if task.well_formed is None:
        gold = task.gold_reward(prompts, responses)
        return sum(g > -1 for g in gold) / len(gold)
    return sum(bool(task.well_formed(p, r)) for p, r in zip(prompts, responses)) / len(prompts)


__all__ = ["pretrain_model", "gold_of_samples"]
