"""The host side of reward-model training and pretraining / SFT (backend-neutral, numpy only).

The math of one optimiser step lives in the backends (`ppo_jax/reward_model.py`, `ppo_jax/sft.py`
and their `ppo_torch` mirrors); the data is encoded by `ppo_rlhf.data.encoding`, in the seeded
order of `ppo_rlhf.runtime.seeds`; the steps run through the one host loop, owned by each
trainer (`self.loop`, a `ppo_rlhf.runtime.loop.HostLoop`: metrics, progress, checkpoints, resume,
signals, the non-finite-update guard); this module holds the rest: the learning-rate schedule, the per-step
records, the held-out evaluation and, for a reward model, the normalisation and the final
metrics.

Optimiser (both): AdamW through each backend's `optim.make_optimizer` (torch.optim.AdamW's
arithmetic in both) and global-norm clipping with torch's formula (`optim.clip_by_global_norm`).
The learning rate of each update is `lr_at(applied updates, total steps)` (warm-up, then constant /
linear / cosine decay), computed on the host and passed to the step. A step whose loss or gradient
is not finite is skipped (weights and optimiser state unchanged, the schedule does not advance);
`max_bad_updates` in a row stop training.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from ppo_rlhf import tokens
from ppo_rlhf.config import RMConfig, SFTConfig
from ppo_rlhf.data.encoding import PreferenceGroups, SFTData, encode_preferences, encode_sequences, encode_sft
from ppo_rlhf.eval.preferences import group_accuracy, normalisation, rating_pair_accuracy
from ppo_rlhf.lora import require_full_base
from ppo_rlhf.runtime.loop import HostLoop, LoopCounter, fmt
from ppo_rlhf.runtime.metrics import jsonable
from ppo_rlhf.runtime.processes import SINGLE_PROCESS, Processes
from ppo_rlhf.runtime.roles import ModelKit, check_built_with
from ppo_rlhf.runtime.seeds import rm_batch_rows, sft_batch_indices


class LabelQuality(Protocol):
    """How good the labels themselves are, for labels whose source knows it (the synthetic
    labeller: `ppo_rlhf.feedback.labeller.SYNTHETIC_LABELS`): the best accuracy any scorer can
    expect on these records, and a scorer's accuracy in expectation over the label noise. Either
    may raise ValueError / TypeError / KeyError for records it knows nothing of (human labels):
    the metric is then None."""

    def noise_ceiling(self, records: Sequence[Any]) -> float: ...

    def expected_accuracy(self, records: Sequence[Any], scores: np.ndarray) -> float: ...


def lr_factor(step: int, total_steps: int, config: RMConfig | SFTConfig) -> float:
    """Learning-rate multiplier of optimiser update `step` (0-based) of `total_steps`: linear
    warm-up (step + 1) / warmup_steps, then 1 ("constant") or a linear / cosine decay from 1 to
    min_lr_ratio at the last step (and min_lr_ratio after it)."""
    warm, lo = int(config.warmup_steps), float(config.min_lr_ratio)
    if step < warm:
        return (step + 1.0) / warm
    p = min(1.0, max(0.0, (step - warm) / max(1, int(total_steps) - warm - 1)))
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "linear":
        return 1.0 - (1.0 - lo) * p
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def lr_at(step: int, total_steps: int, config: RMConfig | SFTConfig) -> float:
    """The learning rate of optimiser update `step`: learning_rate * `lr_factor`. Computed on
    the host and handed to the backend's step as a number (so a compiled JAX step serves any
    schedule and length)."""
    return float(config.learning_rate) * lr_factor(step, total_steps, config)


class SupervisedTrainer:
    """What the reward-model and SFT trainers share: the host loop they own (`self.loop`, counter
    "step"), the tokenizer, the model checks, the learning-rate schedule over APPLIED updates
    (`applied`, a counter of their own in the checkpoint) and the skipped-step accounting. The
    backend subclass supplies the model, the step and `save_checkpoint` / `load_checkpoint`."""

    backend = "?"  # the backend subclass's name
    config_class: type = object  # what `config` must be: RMConfig / SFTConfig

    def __init__(self, config: Any, *, tokenizer: Any, out_dir: Any, checkpoint_every: int,
                 keep_checkpoints: int, model_path: Any = None):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be an {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.processes: Processes = SINGLE_PROCESS
        self.history: list[dict[str, Any]] = []  # the record of every step this trainer ran
        self.loop = HostLoop(self, counter="step", checkpoint_every=checkpoint_every,
                             keep_checkpoints=keep_checkpoints)
        self.tokenizer = tokens.resolve_tokenizer(tokenizer, model_path)
        # the model's checkpoint dir (None for a model object): a LoRA model's saved adapter
        # points to it as its base (`adapter_config.json`'s base_model_name_or_path)
        self.model_source = (str(Path(model_path).absolute()) if isinstance(model_path, (str, os.PathLike))
                             else None)
        self.applied = 0  # optimiser updates applied (skipped steps excluded)

    def _model_from(self, model: Any, load: Callable[..., Any], model_class: type, kit: ModelKit) -> Any:
        """The backend's trainers' one way in: `model` loaded by `load(path, options=...)` with
        the config's model options when it is a checkpoint dir, else required to be a
        `model_class` built with them (`roles.check_built_with`); then checked against the
        tokenizer and max_length (`_check_model`). A PEFT adapter dir loads merged (a full
        model); with LoRA it is a UsageError (`ppo_rlhf.lora.require_full_base`: the new
        adapter needs a full checkpoint as its base)."""
        options = self.config.model_options(self.config.LORA_ROLES[0])  # the model it trains
        require_full_base(model, "model", options.lora)
        if isinstance(model, (str, os.PathLike)):
            model = load(model, options=options)
        elif not isinstance(model, model_class):
            raise TypeError(f"model must be a checkpoint dir or a {model_class.__name__}, got "
                            f"{type(model).__name__}")
        else:
            check_built_with(kit, "given", model, options)
        self._check_model(model)
        return model

    def _check_model(self, model: Any) -> None:
        """The tokenizer's ids fit the model's vocabulary and max_length fits its positions
        (`ppo_rlhf.tokens.check_vocab`, `check_positions`): a clear error before any compilation,
        not a shape error inside it."""
        tokens.check_vocab(self.tokenizer, {"model": model.config.vocab_size})
        tokens.check_positions(self.config.max_length, "max_length",
                               "lower it (--max-length / the config's max_length)", [model.config])

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("text data needs a tokenizer: pass tokenizer= (or a model dir holding one)")
        return self.tokenizer

    step = LoopCounter("Steps done (the loop's counter).")

    def extra_state(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def restore_extra_state(self, state: dict[str, Any]) -> None:
        self.applied = int(state["applied"])

    def _lr(self, total: int) -> float:
        """The learning rate of the next applied update (the schedule counts applied updates)."""
        return lr_at(self.applied, total, self.config)

    def _after_step(self, skipped: bool) -> None:
        self.applied += 0 if skipped else 1
        self.loop.bad_updates.record([skipped], f"step {self.step + 1}")

    def _finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """fit()'s end: the model (+ tokenizer) and metrics.json to out_dir; the metrics."""
        if self.out_dir is not None:
            self.save_model(self.out_dir)
            (self.out_dir / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2,
                                                                  sort_keys=True) + "\n")
        self.metrics = metrics
        return metrics

    def _stopped(self) -> dict[str, Any]:
        """fit()'s result when a signal stopped training: the checkpoint is written (the loop
        did), nothing is finalised -- `fit(..., resume=True)` continues."""
        self.metrics = {"backend": self.backend, "stopped": True, "steps": self.step}
        return self.metrics

    # backend hooks
    def save_model(self, path: str | os.PathLike, *, merge: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _save_tokenizer(self, path: str | os.PathLike) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))


class RMTrainerBase(SupervisedTrainer):
    """The reward-model training loop; backends implement `_init_optimizer(total_steps)`,
    `_train_step(batch, lr) -> {loss, grad_norm, skipped, scores [B, K]}`,
    `_score(ids, mask) -> [N]`, `_group_loss(scores [B, K], batch) -> per-row loss [B]`,
    `set_normalisation(gain, bias)`, `save_model`, `save_checkpoint`, `load_checkpoint`."""

    config_class = RMConfig

    def encode(self, records: Iterable[Any], **kw: Any) -> PreferenceGroups:
        return encode_preferences(records, self._require_tokenizer(), self.config, **kw)

    def total_steps(self, n_train: int) -> int:
        cfg = self.config
        total = cfg.num_epochs * -(-n_train // cfg.batch_size)
        return min(total, cfg.max_steps) if cfg.max_steps else total

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, data: PreferenceGroups) -> dict[str, float]:
        """Held-out loss (mean over groups) and pairwise accuracy (`group_accuracy`) of the
        current model; for loss="rating" the accuracy is over same-prompt rating pairs."""
        B = self.config.batch_size
        losses, scores = [], []
        for start in range(0, len(data), B):
            rows = np.arange(start, min(start + B, len(data)))
            w = np.ones(B, np.float32)
            w[len(rows):] = 0.0
            batch = data.batch(np.resize(rows, B), w)
            _, K, T = batch["input_ids"].shape  # scored flat: the program `sequence_scores` uses
            s = np.asarray(self._score(batch["input_ids"].reshape(B * K, T),
                                       batch["attention_mask"].reshape(B * K, T))).reshape(B, K)
            loss = self._group_loss(s, batch)
            losses.append(np.asarray(loss)[:len(rows)])
            scores.append(np.asarray(s)[:len(rows)])
        loss_all, s_all = np.concatenate(losses), np.concatenate(scores)
        out = {"loss": float(loss_all.mean())}
        if self.config.loss == "rating":
            acc, n = rating_pair_accuracy(data.prompts, [r.rating for r in data.records], s_all[:, 0])
        else:
            acc, n = group_accuracy(s_all, data.tiers)
        out.update(accuracy=acc, pairs=n)
        self._last_eval_scores = s_all
        return out

    def sequence_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Raw scores (gain 1, bias 0) of prompt + response sequences, float64 [N]; scored in
        fixed-size chunks (static shapes)."""
        cfg = self.config
        ids, mask, _ = encode_sequences(self._require_tokenizer(), prompts, responses,
                                        max_length=cfg.max_length, append_eos=cfg.append_eos)
        chunk = cfg.batch_size * self._group_size
        out = []
        for start in range(0, len(ids), chunk):
            rows = np.resize(np.arange(start, min(start + chunk, len(ids))), chunk)
            out.append(np.asarray(self._score(ids[rows], mask[rows]))[:min(chunk, len(ids) - start)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    # ---- training ------------------------------------------------------------------------------
    def fit(self, train: Iterable[Any] | PreferenceGroups, eval: Iterable[Any] | PreferenceGroups | None = None, *,
            reference: tuple[Sequence[str], Sequence[str]] | None = None, progress: bool = True,
            resume: bool = False, eval_noise_ceiling: float | None = None,
            label_quality: LabelQuality | None = None, report_to: str = "none") -> dict[str, Any]:
        """Train on `train` (records or encoded groups), evaluate on `eval`, normalise on
        `reference` = (prompts, responses) (default: every training sequence), save the model to
        out_dir. `label_quality` (e.g. the synthetic labeller's) adds the noise ceilings of the
        train and held-out records and the held-out accuracy expected over the label noise; a given
        `eval_noise_ceiling` overrides the held-out one. Returns the final metrics (also written to
        out_dir/metrics.json); when a signal stopped training, {"stopped": True, ...} (a checkpoint
        holds the state: resume=True continues). report_to="tensorboard": per-step metrics also as
        TensorBoard scalars."""
        cfg = self.config
        t0 = time.perf_counter()
        train_g = train if isinstance(train, PreferenceGroups) else self.encode(train)
        eval_g = None
        if eval is not None:
            eval_g = eval if isinstance(eval, PreferenceGroups) else self.encode(
                eval, rating_stats=(train_g.rating_mean, train_g.rating_std) if cfg.loss == "rating" else None,
                group_size=train_g.group_size)
        self._group_size = max(train_g.group_size, eval_g.group_size if eval_g else 1)
        total = self.total_steps(len(train_g))
        self._init_optimizer(total)
        per_epoch = -(-len(train_g) // cfg.batch_size)
        last_eval: dict[str, float] | None = None

        def one_step() -> dict[str, Any]:
            nonlocal last_eval
            rows, weight, epoch = rm_batch_rows(cfg.seed, self.step, len(train_g), cfg.batch_size)
            batch = train_g.batch(rows, weight)
            lr = self._lr(total)
            out = self._train_step(batch, lr)
            self._after_step(bool(out["skipped"]))
            acc, _ = group_accuracy(out["scores"], batch["tiers"], weight)
            self.step += 1
            rec = {"step": self.step, "epoch": epoch, "train/loss": float(out["loss"]),
                   "train/accuracy": acc, "train/grad_norm": float(out["grad_norm"]),
                   "train/lr": lr, "train/skipped": bool(out["skipped"])}
            end_of_epoch = self.step % per_epoch == 0 or self.step == total
            if eval_g is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                       or end_of_epoch):
                last_eval = self.evaluate(eval_g)
                rec.update({"eval/loss": last_eval["loss"], "eval/accuracy": last_eval["accuracy"]})
            self.history.append(rec)
            return jsonable(rec)

        def postfix(rec: dict[str, Any]) -> dict[str, str]:
            post = {"loss": fmt(rec["train/loss"])}
            if last_eval is not None:
                post["eval_acc"] = fmt(last_eval["accuracy"])
            return post

        if self.loop.run(total, one_step, resume=resume, progress=progress, postfix=postfix,
                         desc=f"reward model ({self.backend})", report_to=report_to):
            return self._stopped()
        if eval_g is not None and (last_eval is None or total == 0):
            last_eval = self.evaluate(eval_g)
        # the final model on the whole training set: accuracy, and the normalisation reference
        flat_p = [p for p, rs in zip(train_g.prompts, train_g.responses) for _ in rs]
        flat_r = [r for rs in train_g.responses for r in rs]
        train_scores = self.sequence_scores(flat_p, flat_r)
        grouped = np.zeros(train_g.tiers.shape)
        pos = 0
        for n, rs in enumerate(train_g.responses):
            grouped[n, :len(rs)] = train_scores[pos:pos + len(rs)]
            pos += len(rs)
        if cfg.loss == "rating":
            train_acc, _ = rating_pair_accuracy(train_g.prompts, [r.rating for r in train_g.records],
                                                grouped[:, 0])
        else:
            train_acc, _ = group_accuracy(grouped, train_g.tiers)
        # the last epoch's losses, from every record of the run (a resumed one's too)
        last_epoch = self.loop.records[-1]["epoch"] if self.loop.records else None
        epoch_losses = [r["train/loss"] for r in self.loop.records if r["epoch"] == last_epoch]
        gain, bias = 1.0, 0.0
        if cfg.normalise:
            ref = train_scores if reference is None else self.sequence_scores(*reference)
            gain, bias = normalisation(ref)
        self.set_normalisation(gain, bias)
        metrics: dict[str, Any] = {
            "backend": self.backend, "loss_kind": cfg.loss, "steps": self.step,
            "epochs": cfg.num_epochs, "num_train": len(train_g),
            "num_eval": 0 if eval_g is None else len(eval_g),
            "dropped_ties": train_g.dropped + (eval_g.dropped if eval_g else 0),
            "truncated": train_g.truncated + (eval_g.truncated if eval_g else 0),
            "train_loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,  # the last epoch's
            "train_accuracy": train_acc,
            "eval_loss": None if last_eval is None else last_eval["loss"],
            "eval_accuracy": None if last_eval is None else last_eval["accuracy"],
            "eval_pairs": None if last_eval is None else last_eval["pairs"],
            "reward_gain": gain, "reward_bias": bias,
            "normalised_on": None if not cfg.normalise else (
                "train" if reference is None else f"{len(reference[0])} given sequences"),
            "time_s": time.perf_counter() - t0,
        }
        if cfg.loss == "rating":
            metrics.update(rating_mean=train_g.rating_mean, rating_std=train_g.rating_std)
        if eval_g is not None:
            ceiling = eval_noise_ceiling
            if ceiling is None:
                ceiling = _quality_or_none(label_quality, "noise_ceiling", eval_g.records)
            metrics["noise_ceiling"] = ceiling
            metrics["eval_expected_accuracy"] = _quality_or_none(
                label_quality, "expected_accuracy", eval_g.records,
                self._last_eval_scores) if last_eval is not None else None
        metrics["train_noise_ceiling"] = _quality_or_none(label_quality, "noise_ceiling", train_g.records)
        return self._finish(metrics)


def _quality_or_none(quality: LabelQuality | None, measure: str, *args: Any) -> float | None:
    """`quality.<measure>(*args)` (scores [N, K] in each record's response order), or None when
    there is no quality hook or the records do not carry what it needs (human labels, ratings)."""
    if quality is None:
        return None
    try:
        return getattr(quality, measure)(*args)
    except (ValueError, TypeError, KeyError):
        return None


class SFTTrainerBase(SupervisedTrainer):
    """The pretraining / SFT loop; backends implement `_init_optimizer(total_steps)`,
    `_train_step(batch, lr) -> {loss, tokens, grad_norm, skipped}`, `_eval_step(batch) ->
    (loss_sum, tokens)`, `save_model`, `save_checkpoint`, `load_checkpoint`."""

    config_class = SFTConfig

    def encode(self, examples: Iterable[Any]) -> SFTData:
        return encode_sft(examples, self._require_tokenizer(), self.config)

    def evaluate(self, data: SFTData) -> float:
        """Mean next-token loss over every target token of `data` (fixed-size chunks)."""
        B = self.config.batch_size
        total, tokens = 0.0, 0.0
        for start in range(0, len(data), B):
            rows = np.arange(start, min(start + B, len(data)))
            batch = data.batch(np.resize(rows, B))
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][len(rows):] = 0  # repeated rows count once
            s, n = self._eval_step(batch)
            total, tokens = total + float(s), tokens + float(n)
        return total / max(tokens, 1.0)

    def fit(self, train: Iterable[Any] | SFTData, eval: Iterable[Any] | SFTData | None = None, *,
            progress: bool = True, resume: bool = False, report_to: str = "none") -> dict[str, Any]:
        """Train `config.num_steps` steps on `train` (examples or `SFTData`), evaluate on `eval`,
        save the model (+ tokenizer) to out_dir. Returns the final metrics (also written to
        out_dir/metrics.json); when a signal stopped training, {"stopped": True, ...} (a
        checkpoint holds the state: resume=True continues). report_to="tensorboard": per-step
        metrics also as TensorBoard scalars."""
        cfg = self.config
        t0 = time.perf_counter()
        data = train if isinstance(train, SFTData) else self.encode(train)
        eval_d = None if eval is None else (eval if isinstance(eval, SFTData) else self.encode(eval))
        total = cfg.num_steps
        self._init_optimizer(total)
        eval_loss = None
        t_steps, steps_timed = 0.0, 0

        def one_step() -> dict[str, Any]:
            nonlocal eval_loss, t_steps, steps_timed
            rows = sft_batch_indices(cfg.seed, self.step, len(data), cfg.batch_size)
            lr = self._lr(total)
            ts = time.perf_counter()
            out = self._train_step(data.batch(rows), lr)
            loss = float(out["loss"])  # blocks on the step
            if self.step > 0:  # the first step includes compilation
                t_steps += time.perf_counter() - ts
                steps_timed += 1
            self._after_step(bool(out["skipped"]))
            self.step += 1
            rec = {"step": self.step, "train/loss": loss, "train/grad_norm": float(out["grad_norm"]),
                   "train/lr": lr, "train/tokens": int(out["tokens"]),
                   "train/skipped": bool(out["skipped"])}
            if eval_d is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                       or self.step == total):
                eval_loss = self.evaluate(eval_d)
                rec["eval/loss"] = eval_loss
            self.history.append(rec)
            return jsonable(rec)

        if self.loop.run(total, one_step, resume=resume, progress=progress, report_to=report_to,
                         postfix=lambda rec: {"loss": fmt(rec["train/loss"])},
                         desc=f"SFT ({self.backend})"):
            return self._stopped()
        if eval_d is not None and eval_loss is None:
            eval_loss = self.evaluate(eval_d)
        # the whole run's steps (a resumed run: those before the interruption too)
        losses = [r["train/loss"] for r in self.loop.records]
        tokens = sum(r["train/tokens"] for r in self.loop.records)
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        metrics: dict[str, Any] = {
            "backend": self.backend, "steps": self.step, "num_examples": len(data),
            "truncated": data.truncated,
            "final_loss": float(np.mean(tail)) if tail else math.nan,
            "first_loss": losses[0] if losses else math.nan,
            "eval_loss": eval_loss, "train_tokens": tokens,
            "time_s": time.perf_counter() - t0,
            "step_time_s": t_steps / steps_timed if steps_timed else math.nan,
        }
        return self._finish(metrics)
