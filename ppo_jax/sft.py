"""Pretraining and supervised fine-tuning of a causal LM in JAX. Mirror: `ppo_torch/sft.py`.

    trainer = SFTTrainer("ckpt/", SFTConfig(num_steps=500), out_dir="sft/")
    metrics = trainer.fit(examples)        # texts and/or (prompt, response) pairs -> sft/

Next-token cross-entropy averaged over the batch's target tokens: every token after the first of
a plain text, the response tokens (and EOS) of a (prompt, response) pair -- see
`ppo_rlhf.supervised` for tokenisation, fixed shapes, the seeded batch order and the learning-rate
schedule. One optimiser step is one jit-compiled function (static [batch_size, max_length], so it
compiles once; `compiled_steps` caches it per model structure): forward -> masked token-mean NLL ->
gradients -> global-norm clip (torch's formula, `ppo_jax.ppo.clip_by_global_norm`) -> AdamW
(`ppo_jax.ppo.make_optimizer`) at the host's learning rate; a non-finite loss or gradient leaves
weights and optimiser state unchanged.

A fresh model for pretraining: `ppo_rlhf.supervised.write_fresh_checkpoint(dir, hf_config, seed=)`
(numpy init, identical for both backends), then `SFTTrainer(dir, ...)`.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ppo_jax.checkpoint import SupervisedCheckpoint
from ppo_jax.losses import logprobs_from_logits
from ppo_jax.models import CausalLM, load_pretrained
from ppo_jax.ppo import clip_by_global_norm, make_optimizer
from ppo_rlhf.supervised import SFTConfig, SFTTrainerBase

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
                   weight_decay: float) -> tuple[optax.GradientTransformation, Any, Any]:
    """(tx, step, evaluate) for a model structure: jit-compiled functions cached here (shared by
    every trainer of the same structure; each compiles once per input shape).

      step(params, opt_state, rest, batch, lr) -> (params, opt_state, stats)
      evaluate(params, rest, batch) -> (summed NLL, number of target tokens)

    `tx` is AdamW at learning rate 1 (`ppo_jax.ppo.make_optimizer`); `step` scales its update by
    the host's `lr` (`ppo_rlhf.supervised.lr_at`), as optax's scale_by_learning_rate would."""
    tx = make_optimizer(SimpleNamespace(learning_rate=1.0, adam_eps=adam_eps, weight_decay=weight_decay))

    def step(params, opt_state, rest, batch, lr):
        def loss_fn(p):
            return sft_loss(nnx.merge(graphdef, p, rest), batch)

        (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads, grad_norm = clip_by_global_norm(grads, max_grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: lr * u, updates)
        new_params = optax.apply_updates(params, updates)
        # a non-finite loss or gradient skips the step: params and optimiser state unchanged
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
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
    `ppo_rlhf.supervised.SFTTrainerBase.fit`)."""

    backend = "jax"

    def __init__(self, model: Any, config: SFTConfig = SFTConfig(), *, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2):
        if not isinstance(config, SFTConfig):
            raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
        super().__init__(config, tokenizer=tokenizer, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         model_path=model)
        if isinstance(model, (str, os.PathLike)):
            model = load_pretrained(model)
        if not isinstance(model, CausalLM):
            raise TypeError(f"model must be a checkpoint dir or a CausalLM, got {type(model).__name__}")
        self._check_model(model)
        self._def, self.params, self._rest = nnx.split(model, nnx.Param, ...)
        self.tx, self._step, self._evaluate = compiled_steps(
            self._def, config.max_grad_norm, config.adam_eps, config.weight_decay)
        self.opt_state = None

    def model(self) -> CausalLM:
        """The current model (shares the arrays)."""
        return nnx.merge(self._def, self.params, self._rest)

    # ---- the step ------------------------------------------------------------------------------
    def _init_optimizer(self, total_steps: int) -> None:  # noqa: ARG002 -- lr comes per step
        self.opt_state = self.tx.init(self.params)

    def _train_step(self, batch: dict[str, np.ndarray], lr: float) -> dict[str, Any]:
        arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        self.params, self.opt_state, stats = self._step(self.params, self.opt_state, self._rest,
                                                        arrays, float(lr))  # weakly typed: the params' precision
        return jax.device_get(stats)

    def _eval_step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
        total, n = jax.device_get(self._evaluate(self.params, self._rest,
                                                 {k: jnp.asarray(v) for k, v in batch.items()}))
        return float(total), float(n)


def train_sft(model: Any, train: Iterable[Any], eval: Iterable[Any] | None = None, *,
              config: SFTConfig = SFTConfig(), tokenizer: Any = None,
              out_dir: str | os.PathLike | None = None, progress: bool = True,
              **fit_kw: Any) -> tuple[SFTTrainer, dict[str, Any]]:
    """`SFTTrainer(model, config, ...).fit(train, eval)`: (trainer, final metrics)."""
    trainer = SFTTrainer(model, config, tokenizer=tokenizer, out_dir=out_dir)
    return trainer, trainer.fit(train, eval, progress=progress, **fit_kw)


def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                     temperature: float = 0.7, seed: int = 0, max_prompt_len: int | None = None,
                     batch_size: int = 64) -> list[str]:
    """Sample one response per prompt (`ppo_jax.generate.generate`, stopping at EOS) and decode
    it (special tokens skipped). `model`: a CausalLM or a checkpoint dir. Prompts are processed
    in left-padded batches of `batch_size` (the last one completed with repeats, so every batch
    has the same shape); batch i uses the key fold_in(key(seed), i)."""
    from ppo_jax.generate import generate
    from ppo_rlhf.loop import decode_responses, tokenize_prompts

    if isinstance(model, (str, os.PathLike)):
        model = load_pretrained(model)
    prompts = list(prompts)
    if max_prompt_len is None:
        max_prompt_len = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    key = jax.random.key(seed)
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[0]] * (min(batch_size, len(prompts)) - len(chunk))
        q, qm, _ = tokenize_prompts(tokenizer, padded, max_prompt_len)
        gen = generate(model, q, qm, max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=int(pad or 0),
                       key=jax.random.fold_in(key, i))
        out += decode_responses(tokenizer, np.asarray(gen.response_ids),
                                np.asarray(gen.response_mask))[:len(chunk)]
    return out


__all__ = ["SFTTrainer", "train_sft", "compiled_steps", "sft_loss", "token_nll", "sample_responses"]
