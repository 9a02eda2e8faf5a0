"""Pretraining and supervised fine-tuning of a causal LM in JAX. Mirror: `ppo_torch/sft.py`.

    trainer = SFTTrainer("ckpt/", SFTConfig(num_steps=500), out_dir="sft/")
    metrics = trainer.fit(examples)        # texts and/or (prompt, response) pairs -> sft/

Next-token cross-entropy averaged over the batch's target tokens: every token after the first of
a plain text, the response tokens (and EOS) of a (prompt, response) pair -- see
`ppo_rlhf.supervised` for tokenisation, fixed shapes, the seeded batch order and the learning-rate
schedule. One optimiser step is one jit-compiled function (static [batch_size, max_length], so it
compiles once; `compiled_steps` caches it per model structure): forward -> masked token-mean NLL ->
gradients -> global-norm clip (torch's formula, `ppo_jax.optim.clip_by_global_norm`) -> AdamW
(`ppo_jax.optim.make_optimizer`) at the host's learning rate; a non-finite loss or gradient leaves
weights and optimiser state unchanged.

`mesh=` (e.g. "fsdp=4") shards the parameters and AdamW state and splits each batch's rows over
the devices by the rules of `ppo_jax.parallel` (the PPO trainer's). Built on an abstract model
(`load_pretrained(dir, abstract=True)`), the trainer holds no weights and `programs()` gives its
step and its evaluation forward to compile for a topology (`ppo_jax.plan`).

A fresh model for pretraining: `ppo_rlhf.hf_checkpoint.write_fresh_checkpoint(dir, hf_config, seed=)`
(numpy init, identical for both backends), then `SFTTrainer(dir, ...)`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ppo_jax.abstract import evaluate
from ppo_jax.checkpoint import SupervisedCheckpoint
from ppo_jax.losses import logprobs_from_logits
from ppo_jax.models import MODEL_KIT, CausalLM, load_pretrained
from ppo_jax.models.lora import adapter_dropout, has_adapter_dropout, trained_params
from ppo_jax.optim import guarded_step, make_optimizer
from ppo_jax.parallel import Placement, builds_on_host, placement
from ppo_rlhf.config import SFTConfig
from ppo_rlhf.runtime.supervised import SFTTrainerBase

Array = jax.Array


def token_nll(logits: Array, input_ids: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of -log p(token t | tokens < t) over the targets, number of targets): logits at
    position t - 1 predict token t, which counts where loss_mask[:, t] == 1 (t >= 1)."""
    lp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    target = loss_mask[:, 1:] != 0
    return -jnp.sum(jnp.where(target, lp, 0.0)), jnp.sum(target)


def sft_loss(model: CausalLM, batch: dict[str, Array]) -> tuple[Array, Array]:
    """(token-mean next-token NLL of the batch, number of target tokens)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    total, n = token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return total / jnp.maximum(n, 1).astype(total.dtype), n


@functools.lru_cache(maxsize=32)
def compiled_steps(graphdef: Any, max_grad_norm: float | None, adam_eps: float,
                   weight_decay: float, mesh: Any = None) -> tuple[optax.GradientTransformation, Any, Any]:
    """(tx, step, evaluate) for a model structure: jit-compiled functions cached here (shared by
    every trainer of the same structure; each compiles once per input shape).

      step(params, opt_state, rest, batch, lr[, key]) -> (params, opt_state, stats)
        (key: LoRA dropout's key of the step, given only to a model with lora_dropout > 0)
      evaluate(params, rest, batch) -> (summed NLL, number of target tokens)

    `tx` is AdamW at learning rate 1 (`ppo_jax.optim.make_optimizer`); `step` scales its update by
    the host's `lr` (`ppo_rlhf.runtime.supervised.lr_at`), as optax's scale_by_learning_rate would.
    `mesh` (a jax Mesh or None): the step's new parameters and optimiser state keep the parameter
    rule's shardings (`ppo_jax.parallel`)."""
    tx = make_optimizer(learning_rate=1.0, adam_eps=adam_eps, weight_decay=weight_decay)
    parallel = Placement(mesh)

    def step(params, opt_state, rest, batch, lr, key=None):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            if key is None:
                return sft_loss(model, batch)
            with adapter_dropout(model, key):  # LoRA dropout: this forward only
                return sft_loss(model, batch)

        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # clip, AdamW at the host's lr; a non-finite loss or gradient skips the step
        params, opt_state, grad_norm, ok = guarded_step(tx, params, opt_state, grads, loss,
                                                        max_grad_norm=max_grad_norm, lr=lr)
        params, opt_state = parallel.constrain_params((params, opt_state))
        return params, opt_state, {"loss": loss, "tokens": n, "grad_norm": grad_norm, "skipped": ~ok}

    def evaluate(params, rest, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["input_ids"],
                                                    attention_mask=batch["attention_mask"])
        return token_nll(logits, batch["input_ids"], batch["loss_mask"])

    return tx, jax.jit(step, donate_argnums=(0, 1)), jax.jit(evaluate)


class SFTTrainer(SupervisedCheckpoint, SFTTrainerBase):
    """Causal-LM trainer (JAX). `model`: a checkpoint dir or a `CausalLM` (trained in float32);
    `tokenizer`: a transformers tokenizer or its dir (default: the model dir's). `fit(train,
    eval)` trains config.num_steps steps and saves the model + tokenizer to out_dir (see
    `ppo_rlhf.runtime.supervised.SFTTrainerBase.fit`). `mesh`: None (one device), a
    `jax.sharding.Mesh` or a spec such as "fsdp=4" (`ppo_jax.parallel`)."""

    backend = "jax"

    @builds_on_host  # a mesh: load into host memory, then shard onto the devices
    def __init__(self, model: Any, config: SFTConfig = SFTConfig(), *, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2, mesh: Any = None):
        super().__init__(config, tokenizer=tokenizer, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         model_path=model)
        self.parallel = placement(mesh)  # one device, or the sharding rules of a mesh
        self.parallel.check_config(config)
        # a checkpoint dir with a mesh: loaded straight onto its shards (no whole host copy)
        model = self._model_from(model, functools.partial(load_pretrained, mesh=self.parallel.mesh),
                                 CausalLM, MODEL_KIT)
        # trained: every weight, or with LoRA the adapters (+ a reward head); a LoRA model's base
        # weights ride in _rest, placed by the parameter rule
        self._def, params, base, rest = nnx.split(model, trained_params(model), nnx.Param, ...)
        self.params = self.parallel.params(params)
        self._rest = nnx.merge_state(self.parallel.params(base), jax.tree.map(self.parallel.replicated, rest))
        self.tx, self._step, self._evaluate = compiled_steps(
            self._def, config.max_grad_norm, config.adam_eps, config.weight_decay, self.parallel.mesh)
        self._init_optimizer(0)
        self._adapter_dropout = has_adapter_dropout(model)

    def _dropout_key(self, step: int | None) -> tuple:
        """(the LoRA dropout key of step `step`, a pure function of (seed, step); abstract for
        None,) -- or () for a model without dropout (its step takes no key)."""
        return self.parallel.dropout_key(self.config.seed, step) if self._adapter_dropout else ()

    def model(self) -> CausalLM:
        """The current model (shares the arrays)."""
        return nnx.merge(self._def, self.params, self._rest)

    # ---- the step ------------------------------------------------------------------------------
    def _init_optimizer(self, total_steps: int) -> None:  # lr comes per step
        self.opt_state = self.parallel.params(evaluate(self.tx.init, self.params))

    def _train_step(self, batch: dict[str, np.ndarray], lr: float) -> dict[str, Any]:
        self.parallel.check_training()  # a tensor axis: refused (wrong gradients on this XLA)
        arrays = self.parallel.batch(dict(batch))
        self.params, self.opt_state, stats = self._step(self.params, self.opt_state, self._rest,
                                                        arrays, float(lr),  # weakly typed: the params' precision
                                                        *self._dropout_key(self.step))
        return self.parallel.fetch(stats)

    def _eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        total, n = self.parallel.fetch(self._evaluate(self.params, self._rest,
                                                      self.parallel.batch(dict(batch))))
        return float(total), float(n)

    # ---- the programs of one step, for compiling without running (ppo_jax.plan) ------------------
    def programs(self) -> dict[str, tuple[Any, tuple, tuple]]:
        """The jitted programs of training, with abstract arguments of this trainer's shapes and
        shardings: {name: (jitted function, args, state args)} as `PPOTrainer.programs`. The
        step and the evaluation forward, each on [batch_size, max_length] batches."""
        B, T = self.config.batch_size, self.config.max_length
        i32 = jnp.int32
        arrays = self.parallel.batch({k: jax.ShapeDtypeStruct((B, T), i32)
                                      for k in ("input_ids", "attention_mask", "loss_mask")})
        lr = self.parallel.replicated(jax.ShapeDtypeStruct((), jnp.float32, weak_type=True))
        return {
            "train_step": (self._step, (self.params, self.opt_state, self._rest, arrays, lr,
                                        *self._dropout_key(None)),
                           (self.params, self.opt_state, self._rest)),
            "eval_step": (self._evaluate, (self.params, self._rest, arrays), (self.params, self._rest)),
        }

    def resident_state(self) -> dict[str, Any]:
        """The arrays that live on the devices for the whole run: the trained weights, their AdamW
        state and the rest of the model (with LoRA: the frozen base weights)."""
        return {"params": self.params, "opt_state": self.opt_state, "rest": self._rest}


def train_sft(model: Any, train: Iterable[Any], eval: Iterable[Any] | None = None, *,
              config: SFTConfig = SFTConfig(), tokenizer: Any = None,
              out_dir: str | os.PathLike | None = None, progress: bool = True,
              **fit_kw: Any) -> tuple[SFTTrainer, dict[str, Any]]:
    """`SFTTrainer(model, config, ...).fit(train, eval)`: (trainer, final metrics)."""
    trainer = SFTTrainer(model, config, tokenizer=tokenizer, out_dir=out_dir)
    return trainer, trainer.fit(train, eval, progress=progress, **fit_kw)


__all__ = ["SFTTrainer", "train_sft", "compiled_steps", "sft_loss", "token_nll"]
