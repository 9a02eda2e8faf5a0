"""Reward-model training in PyTorch. Mirror: `ppo_jax/reward_model.py`.

    trainer = RewardModelTrainer("sft/", RMConfig(num_epochs=2), out_dir="rm/")
    metrics = trainer.fit(train_records, eval_records)   # -> rm/ (HF scalar checkpoint)
    metrics["eval_accuracy"]

The model is a `ScalarHeadModel`: a scalar-head checkpoint, or a causal LM given a fresh score
head by `scalar_model_from_lm(seed=config.seed)` (the same head in both backends). Every record
is a group of K sequences with tiers (0 = best); the score of a sequence is `model.score` (the
head at its last real token; gain 1 and bias 0 while training). Losses, batching, the held-out
accuracy and the reward normalisation are defined in `ppo_rlhf.supervised` (module docstring).

One optimiser step: scores -> per-group loss -> weighted mean -> backward -> global-norm clip
(`ppo_torch.optim.clip_by_global_norm`, torch.nn.utils.clip_grad_norm_) -> AdamW
(`ppo_torch.optim.make_optimizer`, torch.optim.AdamW) at the learning rate
`ppo_rlhf.runtime.supervised.lr_at` hands it (set in the param groups); a step whose loss or gradient is
not finite leaves weights and optimiser state unchanged. Dropout is off (the model is in eval mode).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import numpy as np
import torch

from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions, RMConfig
from ppo_rlhf.runtime.seeds import dropout_seed
from ppo_rlhf.runtime.supervised import RMTrainerBase
from ppo_torch.checkpoint import SupervisedCheckpoint
from ppo_torch.models import (
    MODEL_KIT,
    ScalarHeadModel,
    load_pretrained,
    load_scalar_model,
    scalar_model_from_lm,
)
from ppo_torch.models.lora import adapter_dropout
from ppo_torch.optim import guarded_step, make_optimizer

Tensor = torch.Tensor


# ---- losses (per group; see ppo_rlhf.supervised) ----------------------------------------------------
def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) = -log sigma(-x), stable for any x."""
    return torch.logaddexp(torch.zeros_like(x), x)


def _pair_masks(tiers: Tensor) -> tuple[Tensor, Tensor]:
    """(ordered [B, K, K]: i strictly better than j; tied [B, K, K]: same tier, i < j)."""
    valid = tiers >= 0
    both = valid[:, :, None] & valid[:, None, :]
    ti, tj = tiers[:, :, None], tiers[:, None, :]
    K = tiers.shape[1]
    upper = torch.triu(torch.ones((K, K), dtype=torch.bool, device=tiers.device), diagonal=1)[None]
    return both & (ti < tj), both & (ti == tj) & upper


def bradley_terry_loss(scores: Tensor, tiers: Tensor, margin: Tensor | None = None, *,
                       ties: str = "drop") -> Tensor:
    """[B]: mean over each group's ordered pairs of -log sigma(s_i - s_j - margin) (+ the tie
    terms -log sigma(d)/2 - log sigma(-d)/2 with ties="keep"); 0 for a group without pairs."""
    ordered, tied = _pair_masks(tiers)
    d = scores[:, :, None] - scores[:, None, :]
    m = 0.0 if margin is None else margin[:, None, None]
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    terms = torch.where(ordered, _softplus(-(d - m)), zero)
    n = ordered.sum(dim=(1, 2))
    if ties == "keep":
        terms = terms + torch.where(tied, 0.5 * (_softplus(-d) + _softplus(d)), zero)
        n = n + tied.sum(dim=(1, 2))
    return terms.sum(dim=(1, 2)) / n.clamp(min=1).to(scores.dtype)


def plackett_luce_loss(scores: Tensor, tiers: Tensor, *, ties: str = "drop",
                       best_only: bool = False) -> Tensor:
    """[B]: sum over responses i of (logsumexp_{j in R_i} s_j - s_i) / |tier(i)|, R_i = {i} and
    the lower tiers (+ i's own tier with ties="keep"); best_only keeps the best tier's terms
    (best-of-K softmax)."""
    K = tiers.shape[1]
    valid = tiers >= 0
    ti, tj = tiers[:, :, None], tiers[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    below = (tj >= ti) if ties == "keep" else (tj > ti)
    risk = torch.eye(K, dtype=torch.bool, device=tiers.device)[None] | (both & below)
    neg_inf = torch.full((), -torch.inf, dtype=scores.dtype, device=scores.device)
    lse = torch.logsumexp(torch.where(risk, scores[:, None, :], neg_inf), dim=-1)
    tier_size = (both & (ti == tj)).sum(dim=-1)
    term = (lse - scores) / tier_size.clamp(min=1).to(scores.dtype)
    use = valid & (tiers == 0) if best_only else valid
    return torch.where(use, term, torch.zeros((), dtype=scores.dtype, device=scores.device)).sum(dim=-1)


def rating_loss(scores: Tensor, targets: Tensor) -> Tensor:
    """[B]: (score - standardised rating)^2 of K = 1 groups."""
    return (scores[:, 0] - targets) ** 2


def group_loss(scores: Tensor, tiers: Tensor, margin: Tensor, targets: Tensor, *,
               loss: str = "bradley_terry", ties: str = "drop") -> Tensor:
    """The per-group loss [B] of `RMConfig.loss` (scores [B, K] float32, tiers [B, K] int)."""
    if loss == "bradley_terry":
        return bradley_terry_loss(scores, tiers, margin, ties=ties)
    if loss in ("plackett_luce", "best_of_k"):
        return plackett_luce_loss(scores, tiers, ties=ties, best_only=loss == "best_of_k")
    if loss == "rating":
        return rating_loss(scores, targets)
    raise ValueError(f"loss={loss!r} is invalid")


def group_scores(model: ScalarHeadModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """model.score of every sequence of [B, K, T] groups -> [B, K] float32."""
    B, K, T = input_ids.shape
    return model.score(input_ids.reshape(B * K, T), attention_mask.reshape(B * K, T)).reshape(B, K)


def batch_loss(model: ScalarHeadModel, batch: dict[str, Tensor], *, loss: str,
               ties: str) -> tuple[Tensor, Tensor]:
    """(weighted mean of the group losses over the batch, scores [B, K])."""
    scores = group_scores(model, batch["input_ids"], batch["attention_mask"])
    per_group = group_loss(scores, batch["tiers"], batch["margin"], batch["targets"],
                           loss=loss, ties=ties)
    w = batch["weight"]
    return (w * per_group).sum() / w.sum().clamp(min=1.0), scores


# ---- the model ---------------------------------------------------------------------------------------
def init_reward_model(path: str | os.PathLike, *, seed: int = 0, dtype: Any = "float32",
                      options: ModelOptions | None = None) -> ScalarHeadModel:
    """The model to train from a checkpoint dir: a scalar-head checkpoint as it is, a causal LM
    with a fresh score head (`scalar_model_from_lm(path, seed=seed)`); a PEFT adapter dir (the
    output of `ppo-rlhf pretrain` / `train-rm --lora-rank`) as its adapters merged into its base
    (`options` must have no LoRA: `ppo_rlhf.lora.require_full_base`)."""
    base = lr.adapter_base(path)
    if base is not None and not lr.is_scalar_adapter(path):  # a causal LM's adapter: merged
        lm = load_pretrained(path, dtype, options=options or ModelOptions())
        return scalar_model_from_lm(lm, seed=seed, options=options)
    if base is not None:  # a reward model's adapter: merged (load_scalar_model)
        return load_scalar_model(path, dtype, options=options)
    if hfc.is_scalar_checkpoint(path):
        return load_scalar_model(path, dtype, options=options)
    return scalar_model_from_lm(path, seed=seed, dtype=dtype, options=options)


def _tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.array(v, copy=True))
        out[k] = (t.long() if np.issubdtype(np.asarray(v).dtype, np.integer) else t).to(device)
    return out


class RewardModelTrainer(SupervisedCheckpoint, RMTrainerBase):
    """Reward-model trainer (PyTorch). `model`: a checkpoint dir (causal LM or scalar head; see
    `init_reward_model`) or a `ScalarHeadModel`; `tokenizer`: a transformers tokenizer or its
    dir (default: the model dir's). `fit(train, eval)` trains, evaluates, normalises and saves
    to out_dir (see `ppo_rlhf.runtime.supervised.RMTrainerBase.fit`). `device`: default "cuda" when
    available, else "cpu"."""

    backend = "torch"

    def __init__(self, model: Any, config: RMConfig = RMConfig(), *, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2, device: Any = None):
        super().__init__(config, tokenizer=tokenizer, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         model_path=model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = self._model_from(model, functools.partial(init_reward_model, seed=config.seed),
                                 ScalarHeadModel, MODEL_KIT)
        model.reward_gain, model.reward_bias = 1.0, 0.0  # train the raw head
        self._model = model.to(self.device).eval()  # eval: no dropout; gradients still flow
        self._group_size = 2
        self.gain, self.bias = 1.0, 0.0

    def model(self) -> ScalarHeadModel:
        """The current model with the current reward gain / bias (shares the weights with the
        model being trained, which keeps gain 1 and bias 0)."""
        return ScalarHeadModel(self._model.hf_model, reward_gain=self.gain, reward_bias=self.bias,
                               options=self._model.options).eval()

    # ---- the step ------------------------------------------------------------------------------
    def _init_optimizer(self, total_steps: int) -> None:  # lr comes per step
        cfg = self.config
        self.params = [p for p in self._model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, learning_rate=cfg.learning_rate,
                                        adam_eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def _train_step(self, batch: dict[str, np.ndarray], lr: float) -> dict[str, Any]:
        cfg = self.config
        b = _tensors(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # LoRA dropout (lora_dropout > 0): this step's forward and backward only, its masks a
        # pure function of (seed, step)
        with adapter_dropout(self._model, dropout_seed(cfg.seed, self.step)):
            loss, scores = batch_loss(self._model, b, loss=cfg.loss, ties=cfg.ties)
            loss.backward()
        # clip, AdamW at the host's lr (ppo_rlhf.runtime.supervised.lr_at); a non-finite loss or
        # gradient skips the step: params, optimiser and schedule unchanged
        grad_norm, ok = guarded_step(self.optimizer, self.params, loss,
                                     max_grad_norm=cfg.max_grad_norm, lr=lr)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "skipped": not ok,
                "scores": scores.detach().cpu().numpy()}

    @torch.no_grad()
    def _group_loss(self, scores: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        cfg = self.config
        b = _tensors({"scores": scores, **{k: batch[k] for k in ("tiers", "margin", "targets")}},
                     self.device)
        return group_loss(b["scores"], b["tiers"], b["margin"], b["targets"], loss=cfg.loss,
                          ties=cfg.ties).cpu().numpy()

    @torch.no_grad()
    def _score(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        b = _tensors({"ids": ids, "mask": mask}, self.device)
        return self._model.score(b["ids"], b["mask"]).cpu().numpy()

    # ---- weights out -------------------------------------------------------------------------------
    def set_normalisation(self, gain: float, bias: float) -> None:
        self.gain, self.bias = float(gain), float(bias)


def train_reward_model(model: Any, train: Iterable[Any], eval: Iterable[Any] | None = None, *,
                       config: RMConfig = RMConfig(), tokenizer: Any = None,
                       out_dir: str | os.PathLike | None = None, progress: bool = True,
                       **fit_kw: Any) -> tuple[RewardModelTrainer, dict[str, Any]]:
    """`RewardModelTrainer(model, config, ...).fit(train, eval)`: (trainer, final metrics)."""
    trainer = RewardModelTrainer(model, config, tokenizer=tokenizer, out_dir=out_dir)
    return trainer, trainer.fit(train, eval, progress=progress, **fit_kw)


__all__ = ["RewardModelTrainer", "train_reward_model", "init_reward_model", "group_loss",
           "group_scores", "batch_loss", "bradley_terry_loss", "plackett_luce_loss", "rating_loss"]
