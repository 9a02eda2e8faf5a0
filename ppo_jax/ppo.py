"""PPO-RLHF in JAX: one iteration, top to bottom, and a trainer you drive in ten lines.
Mirror: `ppo_torch/ppo.py` (diff them: same steps, same names, same stats).

    trainer = PPOTrainer(policy="sft/", reward="rm/", prompts="prompts.txt",
                         config=PPOConfig(num_iterations=50), out_dir="runs/ppo")
    trainer.train()

One iteration (`PPOTrainer.step`):
  1. prompts -> left-padded token ids                                      (host, runtime/ppo.py)
  2. generate responses with the policy (KV cache, jit)                    `generate`
  3. log-probs of policy and reference (logits / temperature), values of
     the critic, scores of a reward model                                  `_rollout_forward`;
     host rewards and the missing-EOS penalty               (host, runtime/ppo.py `_finish_rollout`)
  4. per-token rewards -beta*KL + score on the last token -> GAE ->
     returns (before whitening) -> whitened advantages                     `_advantages`
  5. K epochs x M minibatches (x A micro-batches) of clipped policy and
     value updates, all in ONE jit-compiled `lax.scan`; a step whose loss
     or gradient is not finite is skipped (params and optimiser unchanged) `_update`
  6. adaptive KL controller update; stats            (host, ppo_rlhf/kl_control.py, runtime/ppo.py)

The loop around iterations -- metrics, progress, checkpoints, resume, signals, the guard against
non-finite updates -- is the one host loop of every trainer (`ppo_rlhf.runtime.loop`).

Randomness: sampling keys, prompt order and minibatch permutations are pure functions of
(config.seed, iteration) (`ppo_rlhf.runtime.seeds`), so a resumed run repeats an uninterrupted
one exactly and the PyTorch trainer processes the same minibatches in the same order. Static shapes
(prompt length = config.max_prompt_len, response length = config.max_new_tokens, fixed batch)
mean nothing recompiles after the first iteration.

Scaling: `mesh=` (e.g. "data=2,fsdp=4") shards parameters, optimiser state, KV cache and batches
over a device mesh and lets XLA's SPMD partitioner do the rest (`ppo_jax/parallel.py`, where all
the sharding rules are); mesh=None is one device.

Implementation details, each a config field (see `ppo_rlhf.config.PPOConfig`): the reference is
a frozen copy of the initial policy -- with LoRA on the policy (`lora_rank`, `lora_roles`), the
policy's own base weights with its adapters off (`adapters_disabled`: no second copy), and only
the adapters are trained (and a LoRA critic's adapters and head); log-probs are recomputed with
a full forward pass after sampling (not taken from the sampler, so the first minibatch step
starts at ratio == 1 exactly);
the critic is separate (initialised from the reward model when one is given, as TRL) unless the
policy is a `PolicyWithValueHead` (shared trunk); policy and critic are one parameter tree with
one AdamW and one global-norm gradient clip over both (as TRL's PolicyAndValueWrapper).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.abstract import evaluate
from ppo_jax.advantages import (
    gae,
    group_advantages,
    kl_for_controller,
    reinforce_pp_baseline,
    reinforce_pp_returns,
    shape_rewards,
    whiten,
)
from ppo_jax.generate import SamplingOptions, generate, make_generate_fn
from ppo_jax.losses import kl_loss, policy_loss, value_loss
from ppo_jax.masked import aggregate_loss, aggregation_count
from ppo_jax.models import (
    MODEL_KIT,
    CausalLM,
    PolicyWithValueHead,
    ScalarHeadModel,
    model_options,
    response_logprobs,
    response_logprobs_and_values,
    response_values,
    sequence_scores,
)
from ppo_jax.models.lora import adapter_dropout, adapters_disabled, has_adapter_dropout, trained_params
from ppo_jax.optim import guarded_step, make_optimizer
from ppo_jax.parallel import builds_on_host, placement
from ppo_rlhf.config import PPOConfig
from ppo_rlhf.rollout import RolloutBatch
from ppo_rlhf.runtime import metrics, seeds
from ppo_rlhf.runtime.ppo import TrainerBase, update_keys

Array = jax.Array


# ---- small pure helpers --------------------------------------------------------------------------
class Role:
    """One model of the iteration (actor, critic, reference, reward), split for `jax.jit`: its
    static structure (`graphdef`, and `rest`, the non-parameter state) and, for a frozen role, its
    parameters. `model(params, base)` rebuilds the NNX module around a parameter tree (and, for
    a LoRA model, its frozen base weights). A trainable role's parameters live in the trainer's
    `params` tree only (the optimiser's, replaced by every update), so no stale copy is kept
    alive; its frozen ones (a LoRA model's base weights) in the trainer's `base` tree."""

    def __init__(self, graphdef: Any, rest: Any, params: Any = None):
        self.graphdef, self.rest, self.params = graphdef, rest, params

    @classmethod
    def trainable(cls, model: nnx.Module) -> tuple["Role", Any, Any]:
        """(the role, its trained parameters -- for the trainer's `params` tree --, its frozen
        ones -- the base weights of a LoRA model (`lora.trained_params`), else empty)."""
        graphdef, params, base, rest = nnx.split(model, trained_params(model), nnx.Param, ...)
        return cls(graphdef, rest), params, base

    @classmethod
    def frozen(cls, model: nnx.Module, place: Callable[[Any], Any]) -> "Role":
        """The role holding its own parameters, placed by `place`."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, rest, place(params))

    def model(self, params: Any = None, base: Any = None) -> nnx.Module:
        params = self.params if params is None else params
        return nnx.merge(self.graphdef, params, *(() if base is None else (base,)), self.rest)


def microbatch_weight(mask: Array, loss_agg: str, total: Array) -> Array:
    """A micro-batch's share of its minibatch's loss, so that summing micro-batch losses gives
    exactly the minibatch loss: its `aggregation_count` -- real tokens (token-mean), non-empty
    sequences (seq-mean-token-mean), rows (seq-mean-token-sum-norm) -- over the minibatch's."""
    return aggregation_count(mask, loss_agg) / total


# Stats of one optimiser step: weighted means over micro-batches, except these.
_MAX_STATS, _MIN_STATS = ("val/ratio_max",), ("val/ratio_min",)


class PPOTrainer(TrainerBase):
    """PPO-RLHF trainer (JAX). See the module docstring; arguments:

    policy     -- checkpoint dir, or a `CausalLM` / `PolicyWithValueHead` (shared-trunk critic).
    reward     -- reward model dir or `ScalarHeadModel` (scored on device), or any
                  `ppo_rlhf.RewardModel` / `RewardFn` (scored on the host, from text and ids).
    prompts    -- list of strings or a prompt file (JSONL or text); optional if you call `step`
                  with your own prompts.
    config     -- `PPOConfig`.
    reference  -- dir or `CausalLM`; default: a frozen copy of the initial policy -- also when
                  `reference` is the policy object itself (else it would move with the policy);
                  with LoRA on the policy, the policy with its adapters off (no copy).
    critic     -- dir or `ScalarHeadModel`; default: the reward model's weights when the reward is
                  a model (TRL), else the policy's backbone with a fresh head (seeded).
    tokenizer  -- a `transformers` tokenizer or its dir; default: the policy dir's.
    out_dir    -- run directory for metrics.jsonl, checkpoints and the final policy.
    extra_rewards -- {name: RewardFn} scored on every rollout and logged as objective/<name>
                  (e.g. a gold reward, to watch over-optimisation); not trained on.
    dtype      -- "float32" or "bfloat16" weights (the math stays float32).
    mesh       -- None (one device), a `jax.sharding.Mesh` or a spec such as "data=2,fsdp=4"
                  (`ppo_jax.parallel.make_mesh`); several hosts: call
                  `ppo_jax.parallel.initialize_distributed()` first.
    """

    backend = "jax"

    @builds_on_host  # a mesh: load into host memory, then shard onto the devices
    def __init__(self, policy: Any, reward: Any, prompts: Any = None, *,
                 config: PPOConfig = PPOConfig(), reference: Any = None, critic: Any = None,
                 tokenizer: Any = None, out_dir: str | os.PathLike | None = None,
                 extra_rewards: Mapping[str, Callable] | None = None, dtype: Any = "float32",
                 eos_token_id: int | None = -1, pad_token_id: int | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2, mesh: Any = None):
        super().__init__(policy, prompts, config=config, tokenizer=tokenizer, out_dir=out_dir,
                         extra_rewards=extra_rewards, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints)
        cfg = self.config
        self.parallel = placement(mesh)  # one device, or the sharding rules of a mesh
        self.parallel.check_config(cfg)
        self.processes = self.parallel.processes
        # the roles, each model built with its options (`ppo_rlhf.runtime.roles`)
        # checkpoint dirs with a mesh: loaded straight onto their shards (no whole host copy)
        roles = self._compose_roles(self.parallel.loaders(MODEL_KIT), policy, reward, reference=reference,
                                    critic=critic, dtype=dtype)

        # --- pure state: each role's structure is static, its parameters a pytree -------------
        self.policy, trainable, base = Role.trainable(roles.policy)
        trainable = {"policy": trainable}  # what the optimiser trains: policy (+ critic), one tree
        base = {"policy": base}  # what it does not: a LoRA model's base weights (else empty)
        self.critic = None
        if roles.critic is not None:
            self.critic, trainable["critic"], base["critic"] = Role.trainable(roles.critic)
        place = self.parallel.placer()  # arrays two roles share stay shared (a LoRA critic's base)
        self.params = place(trainable)
        self.base = place(base)
        if roles.reference is None:  # LoRA: the policy's own weights with its adapters off
            with adapters_disabled(roles.policy):
                self.reference = Role.trainable(roles.policy)[0]
        else:
            self.reference = Role.frozen(roles.reference, place)
        self.reward = None if roles.reward_model is None else Role.frozen(roles.reward_model, place)
        del roles, place  # the trained parameters live in self.params only
        self.tx = make_optimizer(learning_rate=cfg.learning_rate, adam_eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)
        self.opt_state = self.parallel.params(evaluate(self.tx.init, self.params))

        self._rollout_forward = jax.jit(self._rollout_forward_impl)
        self._advantages = jax.jit(self._advantages_impl)
        self._update = jax.jit(self._update_impl, donate_argnums=(0, 1))
        # LoRA dropout (lora_dropout > 0): active in the update's forwards only, its key a pure
        # function of (seed, iteration, minibatch step, micro-batch); with rate 0 the update
        # takes no key (the program of a model without dropout)
        self.adapter_dropout = any(m is not None and has_adapter_dropout(m)
                                   for m in (self.policy_model(), self.critic_model()))

    # ---- the models ----------------------------------------------------------------------------
    @property
    def reference_is_policy(self) -> bool:
        """Is the reference the policy with its LoRA adapters off (no weights of its own)?"""
        return self.reference.params is None

    def policy_model(self) -> CausalLM | PolicyWithValueHead:
        """The current policy as an NNX module (shares arrays with the trainer; don't mutate)."""
        return self.policy.model(self.params["policy"], self.base["policy"])

    def reference_model(self) -> CausalLM | PolicyWithValueHead:
        """The reference: a frozen model, or the LoRA policy with its adapters off."""
        if self.reference_is_policy:
            return self.reference.model(self.params["policy"], self.base["policy"])
        return self.reference.model()

    def critic_model(self) -> ScalarHeadModel | PolicyWithValueHead | None:
        """The current critic (the policy itself with a shared trunk; None with a critic-free
        estimator)."""
        if self.shared_trunk:
            return self.policy_model()
        return None if self.critic is None else self.critic.model(self.params["critic"],
                                                                  self.base["critic"])

    def reward_model(self) -> ScalarHeadModel | None:
        """The reward model scoring on device, None with a host reward."""
        return None if self.reward is None else self.reward.model()

    def _models(self, params: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[Any, Any]:
        policy = self.policy.model(params["policy"], base["policy"])
        critic = (policy if self.shared_trunk else None if self.critic is None
                  else self.critic.model(params["critic"], base["critic"]))
        return policy, critic

    # ---- 2. generation ------------------------------------------------------------------------
    def generate(self, query_ids: Any, query_mask: Any, *, iteration: int = 0, noise: Any = None) -> Any:
        cfg = self.config
        key = jax.random.key(seeds.sampling_seed(cfg.seed, iteration))
        return generate(self.policy_model(), *self.parallel.batch((query_ids, query_mask)),
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=self.eos_token_id,
                        pad_token_id=self.pad_token_id,
                        noise=None if noise is None else self.parallel.batch(noise), key=key,
                        cache_sharding=self.parallel.kv_cache)

    # ---- 3. forward passes of the four roles ----------------------------------------------------
    def _rollout_forward_impl(self, params, base, ref_params, rm_params, q, qm, r, rm):
        cfg = self.config
        policy, critic = self._models(params, base)
        # the reference: its own weights, or (ref_params None, LoRA) the policy's, adapters off
        ref = (self.reference.model(params["policy"], base["policy"]) if ref_params is None
               else self.reference.model(ref_params))
        if self.shared_trunk:
            logprobs, values = response_logprobs_and_values(policy, q, qm, r, rm, temperature=cfg.temperature,
                                                            chunk=cfg.logprob_chunk)
        else:
            logprobs = response_logprobs(policy, q, qm, r, rm, temperature=cfg.temperature,
                                         chunk=cfg.logprob_chunk)
            # critic-free: no values (zeros keep the rollout's layout)
            values = jnp.zeros(r.shape, jnp.float32) if critic is None else response_values(critic, q, qm, r, rm)
        ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=cfg.temperature,
                                         chunk=cfg.logprob_chunk)
        if rm_params is None:
            scores = jnp.zeros(q.shape[0], jnp.float32)
        else:
            scores = sequence_scores(self.reward.model(rm_params), q, qm, r, rm)
        return logprobs, ref_logprobs, values, scores

    def rollout(self, query_ids: Any, query_mask: Any, *, iteration: int = 0, noise: Any = None,
                prompts: Sequence[str] | None = None, times: dict | None = None) -> RolloutBatch:
        """Sample responses and score them: a `RolloutBatch` (numpy) with extras `contains_eos`
        (and `extra/<name>` scores of `extra_rewards`)."""
        times = {} if times is None else times
        with metrics.phase_timer(times, "time/generate_s", block=lambda: jax.block_until_ready(gen)):
            gen = self.generate(query_ids, query_mask, iteration=iteration, noise=noise)
        q, qm = self.parallel.batch((np.asarray(query_ids, np.int32), np.asarray(query_mask, np.int32)))
        r, rm = gen.response_ids.astype(jnp.int32), gen.response_mask.astype(jnp.int32)
        with metrics.phase_timer(times, "time/forward_s", block=lambda: jax.block_until_ready(out)):
            out = self._rollout_forward(self.params, self.base, self.reference.params,
                                        None if self.reward is None else self.reward.params,
                                        q, qm, r, rm)
        logprobs, ref_logprobs, values, scores = out
        arrays = dict(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm,
                      logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores)
        with metrics.phase_timer(times, "time/reward_s"):
            batch = self._finish_rollout(arrays, prompts)
        return batch

    # ---- 4. rewards -> advantages ------------------------------------------------------------
    def _advantages_impl(self, scores, logprobs, ref_logprobs, values, mask, kl_coef):
        cfg = self.config
        rewards, kl = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator=cfg.kl_estimator)
        est = cfg.advantage_estimator
        if est == "gae":
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False, unbiased=cfg.whiten_unbiased)
            advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask, shift_mean=cfg.advantages_shift_mean,
                                    unbiased=cfg.whiten_unbiased)
        elif est == "reinforce_pp":
            advantages, returns = reinforce_pp_returns(rewards, mask, gamma=cfg.gamma)
        elif est == "reinforce_pp_baseline":
            advantages, returns, kl = reinforce_pp_baseline(
                scores, logprobs, ref_logprobs, mask, kl_coef, num_generations=cfg.num_generations,
                gamma=cfg.gamma, kl_estimator=cfg.kl_estimator)
        else:  # a group estimator: one advantage per sequence, from its return (the score - KL)
            real = mask != 0
            seq_return = jnp.sum(jnp.where(real, rewards, 0.0), axis=-1)
            per_seq = group_advantages(seq_return, cfg.num_generations, est)
            advantages = jnp.where(real, per_seq[:, None], 0.0)
            returns = jnp.where(real, seq_return[:, None], 0.0)
        return dict(rewards=rewards, kl=kl, advantages=advantages, returns=returns,
                    kl_for_controller=kl_for_controller(kl, mask, units=cfg.kl_units))

    def compute_advantages(self, batch: Mapping[str, Any], kl_coef: float) -> dict[str, Array]:
        return self._advantages(batch["scores"], batch["logprobs"], batch["ref_logprobs"],
                                batch["values"], batch["response_mask"],
                                float(kl_coef))  # weakly typed: the log-probs' precision

    # ---- 5. the update phase: K epochs x M minibatches in one lax.scan --------------------------
    def _loss(self, params, base, mb, weight, key=None):
        policy, critic = self._models(params, base)
        if key is not None:  # LoRA dropout: the training forward (`lora.adapter_dropout`)
            with contextlib.ExitStack() as stack:
                for j, m in enumerate(dict.fromkeys(m for m in (policy, critic) if m is not None)):
                    stack.enter_context(adapter_dropout(m, jax.random.fold_in(key, j)))
                return self._loss_of(policy, critic, mb, weight)
        return self._loss_of(policy, critic, mb, weight)

    def _loss_of(self, policy, critic, mb, weight):
        cfg = self.config
        args = (mb["query_ids"], mb["query_mask"], mb["response_ids"], mb["response_mask"])
        if self.shared_trunk:
            logprobs, values, entropy = response_logprobs_and_values(
                policy, *args, temperature=cfg.temperature, return_entropy=True,
                chunk=cfg.logprob_chunk)
        else:
            logprobs, entropy = response_logprobs(policy, *args, temperature=cfg.temperature,
                                                  return_entropy=True, chunk=cfg.logprob_chunk)
            values = None if critic is None else response_values(critic, *args)
        mask = mb["response_mask"]
        pg_loss, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mask,
                                        kind=cfg.policy_loss, clip_eps=cfg.clip_eps,
                                        clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
                                        loss_agg=cfg.loss_agg, importance_level=cfg.importance_level)
        if cfg.ent_coef == 0:
            entropy = jax.lax.stop_gradient(entropy)  # a statistic only: no backward through it
        ent = aggregate_loss(entropy, mask, cfg.loss_agg)
        loss = pg_loss - cfg.ent_coef * ent
        stats = {
            "loss/policy": pg_loss, "policy/entropy": ent, "policy/approxkl": pg_stats["approx_kl_k3"],
            "policy/approxkl_k1": pg_stats["approx_kl_k1"], "policy/clipfrac": pg_stats["clipfrac"],
            "policy/dual_clipfrac": pg_stats["dual_clipfrac"], "val/ratio": pg_stats["ratio_mean"],
            "val/ratio_max": pg_stats["ratio_max"], "val/ratio_min": pg_stats["ratio_min"],
        }
        if values is not None:
            vf_loss, vf_stats = value_loss(values, mb["values"], mb["returns"], mask,
                                           clip_eps=cfg.value_clip_eps, loss_agg=cfg.loss_agg)
            loss = loss + cfg.vf_coef * vf_loss
            stats.update({"loss/value": vf_loss, "val/clipfrac": vf_stats["vf_clipfrac"],
                          "val/vpred": vf_stats["values_mean"]})
        if cfg.kl_loss_coef:  # KL(pi || pi_ref) in the loss (GRPO), its gradient by the estimator
            kl = aggregate_loss(kl_loss(logprobs, mb["ref_logprobs"], cfg.kl_loss_estimator, mask=mask),
                                mask, cfg.loss_agg)
            loss = loss + cfg.kl_loss_coef * kl
            stats["loss/kl"] = kl
        stats["loss/total"] = loss
        return loss * weight, jax.tree.map(jax.lax.stop_gradient, stats)

    def _minibatch_grads(self, params, base, batch, idx, key=None):
        """Gradient and stats of one minibatch (rows `idx`), summed over its micro-batches;
        `key`: LoRA dropout's key of this minibatch (micro-batch i folds in i), None without."""
        cfg = self.config
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        micro = idx.reshape(cfg.grad_accum_steps, cfg.microbatch_size)
        total = aggregation_count(batch["response_mask"][idx], cfg.loss_agg)

        def one(rows, i):
            mb = self.parallel.constrain_batch(jax.tree.map(lambda x: x[rows], batch))
            w = microbatch_weight(mb["response_mask"], cfg.loss_agg, total)
            k = None if key is None else jax.random.fold_in(key, i)
            (_, stats), grads = grad_fn(params, base, mb, w, k)  # d/d params: base stays frozen
            return grads, stats, w

        grads, stats, w = one(micro[0], 0)
        if cfg.grad_accum_steps == 1:
            return grads, stats
        stats = {k: v if k in _MAX_STATS + _MIN_STATS else w * v for k, v in stats.items()}

        def accumulate(carry, xs):
            g_acc, s_acc = carry
            grads, stats, w = one(*xs)
            g_acc = jax.tree.map(jnp.add, g_acc, grads)
            s_acc = {k: (jnp.maximum(s_acc[k], v) if k in _MAX_STATS else
                         jnp.minimum(s_acc[k], v) if k in _MIN_STATS else s_acc[k] + w * v)
                     for k, v in stats.items()}
            return (g_acc, s_acc), None

        # micro-batch numbers scanned only with dropout: without, the program is as before
        numbers = None if key is None else jnp.arange(1, cfg.grad_accum_steps)
        (grads, stats), _ = jax.lax.scan(accumulate, (grads, stats), (micro[1:], numbers))
        return grads, stats

    def _update_impl(self, params, opt_state, base, batch, minibatch_rows, key=None):
        cfg = self.config

        def step(carry, xs):
            params, opt_state = carry
            idx, j = xs
            k = None if key is None else jax.random.fold_in(key, j)  # LoRA dropout: step j's key
            grads, stats = self._minibatch_grads(params, base, batch, idx, k)
            # one global-norm clip, AdamW; a non-finite loss or gradient skips this step
            params, opt_state, grad_norm, ok = guarded_step(self.tx, params, opt_state, grads,
                                                            stats["loss/total"],
                                                            max_grad_norm=cfg.max_grad_norm)
            params, opt_state = self.parallel.constrain_params((params, opt_state))
            return (params, opt_state), {**stats, "policy/grad_norm": grad_norm, "update/skipped": ~ok}

        # step numbers scanned only with dropout: without, the program is as before
        steps = None if key is None else jnp.arange(minibatch_rows.shape[0])
        (params, opt_state), stats = jax.lax.scan(step, (params, opt_state), (minibatch_rows, steps))
        return params, opt_state, stats

    def update(self, batch: Mapping[str, Any], iteration: int = 0) -> dict[str, np.ndarray]:
        """K epochs x M minibatches on a batch holding the rollout arrays plus `advantages` and
        `returns`. Returns the per-step stats as numpy arrays [K * M]."""
        cfg = self.config
        rows = seeds.minibatch_indices(cfg.seed, iteration, batch_size=cfg.rollout_size,
                                      ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches)
        keys = update_keys(cfg)
        arrays = self.parallel.batch({k: batch[k] for k in keys})
        key = (self.parallel.replicated(jax.random.key(seeds.dropout_seed(cfg.seed, iteration)))
               if self.adapter_dropout else None)
        self.params, self.opt_state, stats = self._update(self.params, self.opt_state, self.base,
                                                          arrays, self.parallel.replicated(rows),
                                                          *(() if key is None else (key,)))
        return self.parallel.fetch(stats)

    # ---- one whole iteration ----------------------------------------------------------------
    def step(self, iteration: int | None = None, *, prompts: Sequence[str] | None = None,
             query_ids: Any = None, query_mask: Any = None, noise: Any = None) -> dict[str, float]:
        """One PPO iteration on `prompts` (default: the next batch of the prompt stream) or on
        pre-tokenised left-padded `query_ids`/`query_mask`. Returns its stats."""
        cfg = self.config
        self.parallel.check_training()  # a tensor axis: refused (wrong gradients on this XLA)
        iteration = self.iteration if iteration is None else iteration
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        prompts, query_ids, query_mask = self._prompts_for(iteration, prompts, query_ids, query_mask)
        batch = self.rollout(query_ids, query_mask, iteration=iteration, noise=noise,
                             prompts=prompts, times=times)
        arrays = self.parallel.batch({k: v for k, v in batch.arrays().items() if not k.startswith("extra/")})
        kl_coef = self.kl_ctl.value
        with metrics.phase_timer(times, "time/advantages_s", block=lambda: jax.block_until_ready(adv)):
            adv = self.compute_advantages(arrays, kl_coef)
        with metrics.phase_timer(times, "time/update_s"):
            update_stats = self.update({**arrays, **adv}, iteration)
        adv = self.parallel.fetch(adv)
        self.kl_ctl.update(adv["kl_for_controller"], cfg.rollout_size)
        self.iteration = iteration + 1
        times["time/iteration_s"] = time.perf_counter() - t0
        return self._collect_stats(iteration, batch, adv, update_stats, kl_coef, times)

    # ---- the programs of one iteration, for compiling without running (ppo_jax.plan) --------------
    def programs(self) -> dict[str, tuple[Callable, tuple, tuple]]:
        """Every jitted program of one iteration, with abstract arguments of this trainer's shapes
        and shardings: {name: (jitted function, args, state args)}, where `state args` are the
        arguments that are the trainer's persistent state (weights, optimiser state), the rest
        being the iteration's batch. `fn.lower(*args).compile()` compiles exactly what `step`
        runs (the same functions, the same placement rules)."""
        cfg = self.config
        B, P, N = cfg.rollout_size, cfg.max_prompt_len, cfg.max_new_tokens  # B: responses
        i32, f32 = jnp.int32, jnp.float32

        def batch(shape, dtype):
            return self.parallel.batch(jax.ShapeDtypeStruct(shape, dtype))

        q, qm, r, rm = batch((B, P), i32), batch((B, P), i32), batch((B, N), i32), batch((B, N), i32)
        graphdef, state = nnx.split(self.policy_model())
        options = SamplingOptions(max_new_tokens=N, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p, eos_token_id=self.eos_token_id,
                                  pad_token_id=self.pad_token_id, source="random")
        key = self.parallel.replicated(jax.eval_shape(lambda: jax.random.key(0)))
        rm_params = None if self.reward is None else self.reward.params
        rows = self.parallel.replicated(jax.ShapeDtypeStruct(
            (cfg.ppo_epochs * cfg.num_minibatches, cfg.minibatch_size), i32))
        arrays = dict(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm,
                      **{k: batch((B, N), f32) for k in update_keys(cfg)[4:]})
        kl_coef = self.parallel.replicated(jax.ShapeDtypeStruct((), f32, weak_type=True))
        return {
            "generate": (make_generate_fn(graphdef, options, self.parallel.kv_cache),
                         (state, q, qm, key), (state,)),
            "rollout_forward": (self._rollout_forward,
                                (self.params, self.base, self.reference.params, rm_params, q, qm, r, rm),
                                (self.params, self.base, self.reference.params, rm_params)),
            "advantages": (self._advantages, (batch((B,), f32), arrays["logprobs"],
                                              batch((B, N), f32), arrays["values"], rm, kl_coef), ()),
            "update": (self._update, (self.params, self.opt_state, self.base, arrays, rows,
                                      *((key,) if self.adapter_dropout else ())),
                       (self.params, self.opt_state, self.base)),
        }

    def resident_state(self) -> dict[str, Any]:
        """The arrays that live on the devices for the whole run: every role's weights and the
        optimiser state."""
        return {"params": self.params, "opt_state": self.opt_state, "base": self.base,
                "reference": self.reference.params,
                "reward": None if self.reward is None else self.reward.params}

    # ---- weights out ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state}

    def save_policy(self, path: str | os.PathLike, *, merge: bool = False) -> None:
        """The current policy in Hugging Face format (loads in `transformers` and both backends);
        with LoRA on the policy, its PEFT adapter (`lora.save_adapter`: adapter_config.json,
        whose base_model_name_or_path is the policy's base checkpoint dir, and
        adapter_model.safetensors; `peft` and both backends' `load_adapter` read it) -- or with
        merge=True the full checkpoint of the adapters merged into the base (`merge_adapters`)."""
        from ppo_jax.models import save_pretrained
        from ppo_jax.models.lora import merge_adapters, save_adapter

        model = self.parallel.gathered(self.policy_model())  # several hosts: all gather ...
        if self.processes.is_main:                         # ... and process 0 writes
            if model_options(model).lora and merge:
                save_pretrained(merge_adapters(model), path)
            elif model_options(model).lora:
                save_adapter(model, path, base_model=self.policy_source)
            else:
                save_pretrained(model, path)
            self._save_tokenizer(path)

    def save_critic(self, path: str | os.PathLike) -> None:
        """The critic in Hugging Face format; a LoRA critic merged (its head trains too: a full
        checkpoint, not an adapter)."""
        from ppo_jax.models import save_pretrained
        from ppo_jax.models.lora import merge_adapters

        model = self.parallel.gathered(self._critic_to_save())
        if self.processes.is_main:
            save_pretrained(merge_adapters(model) if model_options(model).lora else model, path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        from ppo_jax.checkpoint import save_trainer_state

        save_trainer_state(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from ppo_jax.checkpoint import load_trainer_state

        load_trainer_state(self, path)

    def _to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(self.parallel.fetch(x))


__all__ = ["PPOTrainer", "microbatch_weight"]
