"""Pretraining and supervised fine-tuning of a causal LM in PyTorch. Mirror: `ppo_jax/sft.py`.

    trainer = SFTTrainer("ckpt/", SFTConfig(num_steps=500), out_dir="sft/")
    metrics = trainer.fit(examples)        # texts and/or (prompt, response) pairs -> sft/

Next-token cross-entropy averaged over the batch's target tokens: every token after the first of
a plain text, the response tokens (and EOS) of a (prompt, response) pair -- see
`ppo_rlhf.supervised` for tokenisation, fixed shapes, the seeded batch order and the learning-rate
schedule. One optimiser step: forward -> masked token-mean NLL -> backward -> global-norm clip
(`ppo_torch.optim.clip_by_global_norm`) -> AdamW (`ppo_torch.optim.make_optimizer`) at the host's
learning rate; a non-finite loss or gradient leaves weights and optimiser state unchanged. Dropout is off.

A fresh model for pretraining: `ppo_rlhf.hf_checkpoint.write_fresh_checkpoint(dir, hf_config, seed=)`
(numpy init, identical for both backends), then `SFTTrainer(dir, ...)`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import torch

from ppo_rlhf.config import SFTConfig
from ppo_rlhf.runtime.seeds import dropout_seed
from ppo_rlhf.runtime.supervised import SFTTrainerBase
from ppo_torch.checkpoint import SupervisedCheckpoint
from ppo_torch.losses import logprobs_from_logits
from ppo_torch.models import MODEL_KIT, CausalLM, load_pretrained
from ppo_torch.models.lora import adapter_dropout
from ppo_torch.optim import guarded_step, make_optimizer

Tensor = torch.Tensor


def _tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """numpy batch -> tensors on `device` (integers as int64)."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.array(v, copy=True))
        out[k] = (t.long() if np.issubdtype(np.asarray(v).dtype, np.integer) else t).to(device)
    return out


def token_nll(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of -log p(token t | tokens < t) over the targets, number of targets): logits at
    position t - 1 predict token t, which counts where loss_mask[:, t] == 1 (t >= 1)."""
    lp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    target = loss_mask[:, 1:] != 0
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return -torch.where(target, lp, zero).sum(), target.sum()


def sft_loss(model: CausalLM, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(token-mean next-token NLL of the batch, number of target tokens)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    total, n = token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return total / n.clamp(min=1).to(total.dtype), n


class SFTTrainer(SupervisedCheckpoint, SFTTrainerBase):
    """Causal-LM trainer (PyTorch). `model`: a checkpoint dir or a `CausalLM` (trained in
    float32); `tokenizer`: a transformers tokenizer or its dir (default: the model dir's).
    `fit(train, eval)` trains config.num_steps steps and saves the model + tokenizer to out_dir
    (see `ppo_rlhf.runtime.supervised.SFTTrainerBase.fit`). `device`: default "cuda" when available."""

    backend = "torch"

    def __init__(self, model: Any, config: SFTConfig = SFTConfig(), *, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2, device: Any = None):
        super().__init__(config, tokenizer=tokenizer, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         model_path=model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = self._model_from(model, load_pretrained, CausalLM, MODEL_KIT)
        self._model = model.to(self.device).eval()  # eval: no dropout; gradients still flow

    def model(self) -> CausalLM:
        """The model being trained."""
        return self._model

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
            loss, n = sft_loss(self._model, b)
            loss.backward()
        # clip, AdamW at the host's lr (ppo_rlhf.runtime.supervised.lr_at); a non-finite loss or
        # gradient skips the step: params, optimiser and schedule unchanged
        grad_norm, ok = guarded_step(self.optimizer, self.params, loss,
                                     max_grad_norm=cfg.max_grad_norm, lr=lr)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "tokens": int(n), "grad_norm": grad_norm.item(), "skipped": not ok}

    @torch.no_grad()
    def _eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        b = _tensors(batch, self.device)
        logits = self._model(b["input_ids"], attention_mask=b["attention_mask"])
        total, n = token_nll(logits, b["input_ids"], b["loss_mask"])
        return float(total), float(n)


def train_sft(model: Any, train: Iterable[Any], eval: Iterable[Any] | None = None, *,
              config: SFTConfig = SFTConfig(), tokenizer: Any = None,
              out_dir: str | os.PathLike | None = None, progress: bool = True,
              **fit_kw: Any) -> tuple[SFTTrainer, dict[str, Any]]:
    """`SFTTrainer(model, config, ...).fit(train, eval)`: (trainer, final metrics)."""
    trainer = SFTTrainer(model, config, tokenizer=tokenizer, out_dir=out_dir)
    return trainer, trainer.fit(train, eval, progress=progress, **fit_kw)


__all__ = ["SFTTrainer", "train_sft", "sft_loss", "token_nll"]
