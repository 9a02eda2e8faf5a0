"""Reward-model training in JAX. Mirror: `ppo_torch/reward_model.py`.

    trainer = RewardModelTrainer("sft/", RMConfig(num_epochs=2), out_dir="rm/")
    metrics = trainer.fit(train_records, eval_records)   # -> rm/ (HF scalar checkpoint)
    metrics["eval_accuracy"]

The model is a `ScalarHeadModel`: a scalar-head checkpoint, or a causal LM given a fresh score
head by `scalar_model_from_lm(seed=config.seed)` (the same head in both backends). Every record
is a group of K sequences with tiers (0 = best); the score of a sequence is `model.score` (the
head at its last real token; gain 1 and bias 0 while training). Losses, batching, the held-out
accuracy and the reward normalisation are defined in `ppo_rlhf.supervised` (module docstring).

One optimiser step is one jit-compiled function (static shapes [batch_size, K, max_length], so
it compiles once; `compiled_steps` caches it per model structure and loss): scores -> per-group
loss -> weighted mean -> gradients -> global-norm clip (torch's formula,
`ppo_jax.optim.clip_by_global_norm`) -> AdamW (`ppo_jax.optim.make_optimizer`: torch.optim.AdamW's
arithmetic) at the learning rate `ppo_rlhf.runtime.supervised.lr_at` hands it;
a step whose loss or gradient is not finite leaves weights and optimiser state unchanged.

`mesh=` (e.g. "fsdp=4") shards the parameters and AdamW state and splits each batch's groups over
the devices by the rules of `ppo_jax.parallel` (the PPO trainer's). Built on an abstract model
(`init_reward_model(..., abstract=True)`), the trainer holds no weights and `programs()` gives its
step and its scoring forward to compile for a topology (`ppo_jax.plan`).
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
from ppo_jax.models import (
    MODEL_KIT,
    ScalarHeadModel,
    load_pretrained,
    load_scalar_model,
    scalar_model_from_lm,
)
from ppo_jax.models.lora import adapter_dropout, has_adapter_dropout, trained_params
from ppo_jax.optim import guarded_step, make_optimizer
from ppo_jax.parallel import Placement, builds_on_host, placement
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions, RMConfig
from ppo_rlhf.runtime.supervised import RMTrainerBase

Array = jax.Array


# ---- losses (per group; see ppo_rlhf.supervised) ----------------------------------------------------
def _softplus(x: Array) -> Array:
    """log(1 + exp(x)) = -log sigma(-x), stable for any x."""
    return jnp.logaddexp(0.0, x)


def _pair_masks(tiers: Array) -> tuple[Array, Array]:
    """(ordered [B, K, K]: i strictly better than j; tied [B, K, K]: same tier, i < j)."""
    valid = tiers >= 0
    both = valid[:, :, None] & valid[:, None, :]
    ti, tj = tiers[:, :, None], tiers[:, None, :]
    K = tiers.shape[1]
    upper = jnp.triu(jnp.ones((K, K), bool), k=1)[None]
    return both & (ti < tj), both & (ti == tj) & upper


def bradley_terry_loss(scores: Array, tiers: Array, margin: Array | None = None, *,
                       ties: str = "drop") -> Array:
    """[B]: mean over each group's ordered pairs of -log sigma(s_i - s_j - margin) (+ the tie
    terms -log sigma(d)/2 - log sigma(-d)/2 with ties="keep"); 0 for a group without pairs."""
    ordered, tied = _pair_masks(tiers)
    d = scores[:, :, None] - scores[:, None, :]
    m = 0.0 if margin is None else margin[:, None, None]
    terms = jnp.where(ordered, _softplus(-(d - m)), 0.0)
    n = jnp.sum(ordered, axis=(1, 2))
    if ties == "keep":
        terms = terms + jnp.where(tied, 0.5 * (_softplus(-d) + _softplus(d)), 0.0)
        n = n + jnp.sum(tied, axis=(1, 2))
    return jnp.sum(terms, axis=(1, 2)) / jnp.maximum(n, 1).astype(scores.dtype)


def plackett_luce_loss(scores: Array, tiers: Array, *, ties: str = "drop",
                       best_only: bool = False) -> Array:
    """[B]: sum over responses i of (logsumexp_{j in R_i} s_j - s_i) / |tier(i)|, R_i = {i} and
    the lower tiers (+ i's own tier with ties="keep"); best_only keeps the best tier's terms
    (best-of-K softmax)."""
    K = tiers.shape[1]
    valid = tiers >= 0
    ti, tj = tiers[:, :, None], tiers[:, None, :]
    both = valid[:, :, None] & valid[:, None, :]
    below = (tj >= ti) if ties == "keep" else (tj > ti)
    risk = jnp.eye(K, dtype=bool)[None] | (both & below)   # R_i always holds i: lse is finite
    lse = jax.nn.logsumexp(jnp.where(risk, scores[:, None, :], -jnp.inf), axis=-1)
    tier_size = jnp.sum(both & (ti == tj), axis=-1)
    term = (lse - scores) / jnp.maximum(tier_size, 1).astype(scores.dtype)
    use = valid & (tiers == 0) if best_only else valid
    return jnp.sum(jnp.where(use, term, 0.0), axis=-1)


def rating_loss(scores: Array, targets: Array) -> Array:
    """[B]: (score - standardised rating)^2 of K = 1 groups."""
    return (scores[:, 0] - targets) ** 2


def group_loss(scores: Array, tiers: Array, margin: Array, targets: Array, *,
               loss: str = "bradley_terry", ties: str = "drop") -> Array:
    """The per-group loss [B] of `RMConfig.loss` (scores [B, K] float32, tiers [B, K] int)."""
    if loss == "bradley_terry":
        return bradley_terry_loss(scores, tiers, margin, ties=ties)
    if loss in ("plackett_luce", "best_of_k"):
        return plackett_luce_loss(scores, tiers, ties=ties, best_only=loss == "best_of_k")
    if loss == "rating":
        return rating_loss(scores, targets)
    raise ValueError(f"loss={loss!r} is invalid")


def group_scores(model: ScalarHeadModel, input_ids: Array, attention_mask: Array) -> Array:
    """model.score of every sequence of [B, K, T] groups -> [B, K] float32."""
    B, K, T = input_ids.shape
    return model.score(input_ids.reshape(B * K, T), attention_mask.reshape(B * K, T)).reshape(B, K)


def batch_loss(model: ScalarHeadModel, batch: dict[str, Array], *, loss: str,
               ties: str) -> tuple[Array, Array]:
    """(weighted mean of the group losses over the batch, scores [B, K])."""
    scores = group_scores(model, batch["input_ids"], batch["attention_mask"])
    per_group = group_loss(scores, batch["tiers"], batch["margin"], batch["targets"],
                           loss=loss, ties=ties)
    w = batch["weight"]
    return jnp.sum(w * per_group) / jnp.maximum(jnp.sum(w), 1.0), scores


# ---- the model ---------------------------------------------------------------------------------------
def init_reward_model(path: str | os.PathLike, *, seed: int = 0, dtype: Any = "float32",
                      options: ModelOptions | None = None, abstract: bool = False) -> ScalarHeadModel:
    """The model to train from a checkpoint dir: a scalar-head checkpoint as it is, a causal LM
    with a fresh score head (`scalar_model_from_lm(path, seed=seed)`); a PEFT adapter dir (the
    output of `ppo-rlhf pretrain` / `train-rm --lora-rank`) as its adapters merged into its base
    (`options` must have no LoRA: `ppo_rlhf.lora.require_full_base`). abstract=True: from
    config.json alone, no weights (both cases have the same structure: trunk + score head)."""
    base = lr.adapter_base(path)
    if base is not None and not lr.is_scalar_adapter(path):  # a causal LM's adapter: merged
        if abstract:
            return load_scalar_model(base, dtype, options=options, abstract=True)
        lm = load_pretrained(path, dtype, options=options or ModelOptions())
        return scalar_model_from_lm(lm, seed=seed, options=options)
    if abstract:
        return load_scalar_model(path, dtype, options=options, abstract=True)
    if base is not None:  # a reward model's adapter: merged (load_scalar_model)
        return load_scalar_model(path, dtype, options=options)
    if hfc.is_scalar_checkpoint(path):
        return load_scalar_model(path, dtype, options=options)
    return scalar_model_from_lm(path, seed=seed, dtype=dtype, options=options)


@functools.lru_cache(maxsize=32)
def compiled_steps(graphdef: Any, loss: str, ties: str, max_grad_norm: float | None, adam_eps: float,
                   weight_decay: float, mesh: Any = None) -> tuple[optax.GradientTransformation, Any, Any, Any]:
    """(tx, step, score, losses) for a model structure (`graphdef`) and loss: jit-compiled
    functions cached here, so every trainer with the same ones (a resumed run, a second model of
    the same shape) reuses the compilation; each compiles once per input shape.

      step(params, opt_state, rest, batch, lr[, key]) -> (params, opt_state, stats)
        (key: LoRA dropout's key of the step, given only to a model with lora_dropout > 0)
      score(params, rest, ids, mask) -> scores [N]
      losses(scores [B, K], batch) -> per-group loss [B]

    Evaluation is `score` on the flattened groups then `losses`: the held-out batches
    [batch_size, K, max_length] flatten to the shape `sequence_scores` scores in, so the forward
    compiles once for both (one program fewer: ~2 s of compilation at the demo's size).

    `tx` is AdamW at learning rate 1 (`ppo_jax.optim.make_optimizer`); `step` scales its update by
    `lr` -- exactly what optax's own scale_by_learning_rate does -- so the learning rate comes from
    the host (`ppo_rlhf.runtime.supervised.lr_at`) and no schedule is baked into the compiled code.
    `mesh` (a jax Mesh or None): the step's new parameters and optimiser state keep the parameter
    rule's shardings (`ppo_jax.parallel`), so the next step's inputs are placed as this one's."""
    tx = make_optimizer(learning_rate=1.0, adam_eps=adam_eps, weight_decay=weight_decay)
    parallel = Placement(mesh)

    def step(params, opt_state, rest, batch, lr, key=None):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            if key is None:
                return batch_loss(model, batch, loss=loss, ties=ties)
            with adapter_dropout(model, key):  # LoRA dropout: this forward only
                return batch_loss(model, batch, loss=loss, ties=ties)

        (loss_value, scores), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        # clip, AdamW at the host's lr; a non-finite loss or gradient skips the step
        params, opt_state, grad_norm, ok = guarded_step(tx, params, opt_state, grads, loss_value,
                                                        max_grad_norm=max_grad_norm, lr=lr)
        params, opt_state = parallel.constrain_params((params, opt_state))
        return params, opt_state, {"loss": loss_value, "grad_norm": grad_norm, "skipped": ~ok,
                                   "scores": scores}

    def score(params, rest, ids, mask):
        return nnx.merge(graphdef, params, rest).score(ids, mask)

    def losses(scores, batch):
        return group_loss(scores, batch["tiers"], batch["margin"], batch["targets"], loss=loss,
                          ties=ties)

    return tx, jax.jit(step, donate_argnums=(0, 1)), jax.jit(score), jax.jit(losses)


class RewardModelTrainer(SupervisedCheckpoint, RMTrainerBase):
    """Reward-model trainer (JAX). `model`: a checkpoint dir (causal LM or scalar head; see
    `init_reward_model`) or a `ScalarHeadModel`; `tokenizer`: a transformers tokenizer or its
    dir (default: the model dir's). `fit(train, eval)` trains, evaluates, normalises and saves
    to out_dir (see `ppo_rlhf.runtime.supervised.RMTrainerBase.fit`). `mesh`: None (one device),
    a `jax.sharding.Mesh` or a spec such as "fsdp=4" (`ppo_jax.parallel`)."""

    backend = "jax"

    @builds_on_host  # a mesh: load into host memory, then shard onto the devices
    def __init__(self, model: Any, config: RMConfig = RMConfig(), *, tokenizer: Any = None,
                 out_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                 keep_checkpoints: int = 2, mesh: Any = None):
        super().__init__(config, tokenizer=tokenizer, out_dir=out_dir,
                         checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                         model_path=model)
        self.parallel = placement(mesh)  # one device, or the sharding rules of a mesh
        self.parallel.check_config(config)
        model = self._model_from(model, functools.partial(init_reward_model, seed=config.seed),
                                 ScalarHeadModel, MODEL_KIT)
        model.reward_gain, model.reward_bias = 1.0, 0.0  # train the raw head
        # trained: every weight, or with LoRA the adapters (+ a reward head); a LoRA model's base
        # weights ride in _rest, placed by the parameter rule
        self._def, params, base, rest = nnx.split(model, trained_params(model), nnx.Param, ...)
        self.params = self.parallel.params(params)
        self._rest = nnx.merge_state(self.parallel.params(base), jax.tree.map(self.parallel.replicated, rest))
        self.tx, self._step, self._score_fn, self._losses = compiled_steps(
            self._def, config.loss, config.ties, config.max_grad_norm, config.adam_eps,
            config.weight_decay, self.parallel.mesh)
        self._init_optimizer(0)
        self._adapter_dropout = has_adapter_dropout(model)
        self._group_size = 2  # a pair per group until the data says otherwise (`fit`)
        self.gain, self.bias = 1.0, 0.0

    def _dropout_key(self, step: int | None) -> tuple:
        """(the LoRA dropout key of step `step`, a pure function of (seed, step); abstract for
        None,) -- or () for a model without dropout (its step takes no key)."""
        return self.parallel.dropout_key(self.config.seed, step) if self._adapter_dropout else ()

    def model(self) -> ScalarHeadModel:
        """The current model with the current reward gain / bias (shares the arrays)."""
        m = nnx.merge(self._def, self.params, self._rest)
        m.reward_gain, m.reward_bias = self.gain, self.bias
        return m

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

    def _group_loss(self, scores: np.ndarray, batch: dict[str, np.ndarray]) -> np.ndarray:
        keys = ("tiers", "margin", "targets")
        return np.asarray(self._losses(jnp.asarray(scores), {k: jnp.asarray(batch[k]) for k in keys}))

    def _score(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(self.parallel.fetch(self._score_fn(self.params, self._rest,
                                                             *self.parallel.batch((ids, mask)))))

    # ---- the programs of one step, for compiling without running (ppo_jax.plan) ------------------
    def programs(self) -> dict[str, tuple[Any, tuple, tuple]]:
        """The jitted programs of training, with abstract arguments of this trainer's shapes and
        shardings: {name: (jitted function, args, state args)} as `PPOTrainer.programs`. The
        step on a batch of `batch_size` groups of `_group_size` sequences of `max_length` tokens
        (pairs unless `fit` saw larger groups), and the scoring forward that evaluation runs on
        the same groups, flattened."""
        B, K, T = self.config.batch_size, self._group_size, self.config.max_length
        i32, f32 = jnp.int32, jnp.float32

        def batch(shape, dtype):
            return self.parallel.batch(jax.ShapeDtypeStruct(shape, dtype))

        arrays = {"input_ids": batch((B, K, T), i32), "attention_mask": batch((B, K, T), i32),
                  "tiers": batch((B, K), i32), "margin": batch((B,), f32),
                  "targets": batch((B,), f32), "weight": batch((B,), f32)}
        lr = self.parallel.replicated(jax.ShapeDtypeStruct((), f32, weak_type=True))
        return {
            "train_step": (self._step, (self.params, self.opt_state, self._rest, arrays, lr,
                                        *self._dropout_key(None)),
                           (self.params, self.opt_state, self._rest)),
            "eval_step": (self._score_fn, (self.params, self._rest, batch((B * K, T), i32),
                                           batch((B * K, T), i32)), (self.params, self._rest)),
        }

    def resident_state(self) -> dict[str, Any]:
        """The arrays that live on the devices for the whole run: the trained weights, their AdamW
        state and the rest of the model (with LoRA: the frozen base weights)."""
        return {"params": self.params, "opt_state": self.opt_state, "rest": self._rest}

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


__all__ = ["RewardModelTrainer", "train_reward_model", "init_reward_model", "compiled_steps", "group_loss",
           "group_scores", "batch_loss", "bradley_terry_loss", "plackett_luce_loss", "rating_loss"]
