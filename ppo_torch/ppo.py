"""PPO-RLHF in PyTorch: one iteration, top to bottom, and a trainer you drive in ten lines.
Mirror: `ppo_jax/ppo.py` (diff them: same steps, same names, same stats).

    trainer = PPOTrainer(policy="sft/", reward="rm/", prompts="prompts.txt",
                         config=PPOConfig(num_iterations=50), out_dir="runs/ppo")
    trainer.train()

One iteration (`PPOTrainer.step`):
  1. prompts -> left-padded token ids                                      (host, runtime/ppo.py)
  2. generate responses with the policy (KV cache)                         `generate`
  3. log-probs of policy and reference (logits / temperature), values of
     the critic, scores of a reward model                                  `_rollout_forward`;
     host rewards and the missing-EOS penalty               (host, runtime/ppo.py `_finish_rollout`)
  4. per-token rewards -beta*KL + score on the last token -> GAE ->
     returns (before whitening) -> whitened advantages                     `_advantages`
  5. K epochs x M minibatches (x A micro-batches) of clipped policy and
     value updates; a step whose loss or gradient is not finite is
     skipped (params and optimiser unchanged)                              `update`
  6. adaptive KL controller update; stats            (host, ppo_rlhf/kl_control.py, runtime/ppo.py)

The loop around iterations -- metrics, progress, checkpoints, resume, signals, the guard against
non-finite updates -- is the one host loop of every trainer (`ppo_rlhf.runtime.loop`).

Randomness: sampling seeds, prompt order and minibatch permutations are pure functions of
(config.seed, iteration) (`ppo_rlhf.runtime.seeds`), so a resumed run repeats an uninterrupted
one exactly and the JAX trainer processes the same minibatches in the same order.

Scaling: `distributed="ddp"` or `"fsdp"` under torchrun runs one rank of a data-parallel job
(DDP or FSDP2): each rank generates and scores its rows of the batch and takes its rows of every
minibatch, and N ranks compute what one process computes (`ppo_torch/parallel.py`, where all
of it is); distributed=None is one process.

Implementation details, each a config field (see `ppo_rlhf.config.PPOConfig`): the reference is
a frozen copy of the initial policy -- with LoRA on the policy (`lora_rank`, `lora_roles`), the
policy's own base weights with its adapters off (`adapters_disabled`: no second copy), and only
the adapters are trained (and a LoRA critic's adapters and head); log-probs are recomputed with
a full forward pass after sampling (not taken from the sampler, so the first minibatch step
starts at ratio == 1 exactly);
the critic is separate (initialised from the reward model when one is given, as TRL) unless the
policy is a `PolicyWithValueHead` (shared trunk); policy and critic share one AdamW and one
global-norm gradient clip over both (as TRL's PolicyAndValueWrapper). Dropout is off everywhere.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ppo_rlhf.config import PPOConfig
from ppo_rlhf.rollout import RolloutBatch
from ppo_rlhf.runtime import metrics, seeds
from ppo_rlhf.runtime.ppo import TrainerBase, update_keys
from ppo_torch.advantages import (
    gae,
    group_advantages,
    kl_for_controller,
    reinforce_pp_baseline,
    reinforce_pp_returns,
    shape_rewards,
    whiten,
)
from ppo_torch.generate import generate
from ppo_torch.losses import kl_loss, policy_loss, value_loss
from ppo_torch.masked import aggregate_loss, aggregation_count
from ppo_torch.models import (
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
from ppo_torch.models.lora import adapter_dropout, adapters_disabled
from ppo_torch.optim import guarded_step, make_optimizer
from ppo_torch.parallel import setup as setup_distributed

Tensor = torch.Tensor


# ---- small pure helpers --------------------------------------------------------------------------
def microbatch_weight(mask: Tensor, loss_agg: str, total: Tensor) -> Tensor:
    """A micro-batch's share of its minibatch's loss, so that summing micro-batch losses gives
    exactly the minibatch loss: its `aggregation_count` -- real tokens (token-mean), non-empty
    sequences (seq-mean-token-mean), rows (seq-mean-token-sum-norm) -- over the minibatch's."""
    return aggregation_count(mask, loss_agg) / total


# Stats of one optimiser step: weighted means over micro-batches, except these.
_MAX_STATS, _MIN_STATS = ("val/ratio_max",), ("val/ratio_min",)


class PPOTrainer(TrainerBase):
    """PPO-RLHF trainer (PyTorch). See the module docstring; arguments:

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
    device     -- torch device; default "cuda" when available, else "cpu".
    compile    -- wrap every role's forward in `torch.compile`: True for its default backend
                  (inductor), or the name of a dynamo backend (e.g. "eager": traced, not compiled).
    distributed -- None (one process), "ddp" or "fsdp" (one rank of a torchrun job; the device
                  defaults to cuda:LOCAL_RANK, or the CPU with gloo).
    """

    backend = "torch"

    def __init__(self, policy: Any, reward: Any, prompts: Any = None, *,
                 config: PPOConfig = PPOConfig(), reference: Any = None, critic: Any = None,
                 tokenizer: Any = None, out_dir: str | os.PathLike | None = None,
                 extra_rewards: Mapping[str, Callable] | None = None, dtype: Any = "float32",
                 eos_token_id: int | None = -1, pad_token_id: int | None = None,
                 checkpoint_every: int = 0, keep_checkpoints: int = 2,
                 device: Any = None, compile: bool | str = False, distributed: Any = None):
        super().__init__(policy, prompts, config=config, tokenizer=tokenizer, out_dir=out_dir,
                         extra_rewards=extra_rewards, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints)
        cfg = self.config
        self.parallel = setup_distributed(distributed)  # one process, or a rank of a DDP / FSDP2 job
        self.parallel.check_config(cfg)
        self.processes = self.parallel
        self.device = torch.device(device or self.parallel.default_device())
        # the roles, each model built with its options (`ppo_rlhf.runtime.roles`), placed here
        roles = self._compose_roles(MODEL_KIT, policy, reward, reference=reference, critic=critic, dtype=dtype)
        self.policy = roles.policy.to(self.device)
        # None with LoRA on the policy: the reference is the policy with its adapters off
        self.reference = (None if roles.reference is None
                          else roles.reference.to(self.device).requires_grad_(False))
        self.critic = None if roles.critic is None else roles.critic.to(self.device)
        self.reward = (None if roles.reward_model is None
                       else roles.reward_model.to(self.device).requires_grad_(False))
        del roles
        for m in self._roles():
            m.eval()  # no dropout, ever (as TRL); gradients still flow in eval mode
        self.parallel.wrap([self.policy, self.critic], frozen=[self.reference, self.reward])

        self.optimizer = make_optimizer(self._trainable(), learning_rate=cfg.learning_rate,
                                        adam_eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self._fwd = {}
        if compile:
            backend = {"backend": compile} if isinstance(compile, str) else {}
            for m in self._roles():
                m.forward = torch.compile(m.forward, dynamic=False, **backend)

    # ---- the models ----------------------------------------------------------------------------
    def _roles(self) -> list[torch.nn.Module]:
        """The models of the roles there are: policy, reference, critic, reward model."""
        return [m for m in (self.policy, self.reference, self.critic, self.reward) if m is not None]

    def _trainable(self) -> list[torch.nn.Parameter]:
        """What the optimiser trains: the parameters of policy and critic that require grad --
        all of them, or with LoRA the adapters (and a critic's head: `lora.apply_lora`)."""
        params = list(self.policy.parameters())
        if self.critic is not None:
            params += list(self.critic.parameters())
        return [p for p in params if p.requires_grad]

    @property
    def reference_is_policy(self) -> bool:
        """Is the reference the policy with its LoRA adapters off (no weights of its own)?"""
        return self.reference is None

    def _reference(self) -> contextlib.AbstractContextManager:
        """A block in which the yielded model computes the reference: the frozen model, or the
        LoRA policy with its adapters off (restored on exit)."""
        if self.reference_is_policy:
            return adapters_disabled(self.policy)
        return contextlib.nullcontext(self.reference)

    def policy_model(self) -> CausalLM | PolicyWithValueHead:
        return self.policy

    def reference_model(self) -> CausalLM | PolicyWithValueHead:
        """The reference: a frozen model, or (LoRA) the policy -- call it inside
        `adapters_disabled(trainer.reference_model())` for the reference's outputs."""
        return self.policy if self.reference_is_policy else self.reference

    def critic_model(self) -> ScalarHeadModel | PolicyWithValueHead | None:
        """The critic (the policy itself with a shared trunk; None with a critic-free
        estimator)."""
        return self.policy if self.shared_trunk else self.critic

    def reward_model(self) -> ScalarHeadModel | None:
        """The reward model scoring on device, None with a host reward."""
        return self.reward

    def _models(self) -> tuple[Any, Any]:
        return self.policy, self.critic_model()

    # ---- 2. generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, query_ids: Any, query_mask: Any, *, iteration: int = 0, noise: Any = None) -> Any:
        cfg = self.config
        gen = torch.Generator(device=self.device).manual_seed(seeds.sampling_seed(cfg.seed, iteration))
        with self.parallel.generating(self.policy):
            return generate(self.policy, self._tensor(query_ids), self._tensor(query_mask),
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=self.eos_token_id,
                            pad_token_id=self.pad_token_id,
                            noise=None if noise is None else self._tensor(noise), generator=gen,
                            generator_rows=self.parallel.generator_rows(len(query_ids)))

    # ---- 3. forward passes of the four roles ----------------------------------------------------
    @torch.no_grad()
    def _rollout_forward(self, q, qm, r, rm):
        cfg = self.config
        policy, critic = self._models()
        if self.shared_trunk:
            logprobs, values = response_logprobs_and_values(policy, q, qm, r, rm, temperature=cfg.temperature,
                                                            chunk=cfg.logprob_chunk)
        else:
            logprobs = response_logprobs(policy, q, qm, r, rm, temperature=cfg.temperature,
                                         chunk=cfg.logprob_chunk)
            # critic-free: no values (zeros keep the rollout's layout)
            values = (torch.zeros(r.shape, dtype=torch.float32, device=r.device) if critic is None
                      else response_values(critic, q, qm, r, rm))
        with self._reference() as ref:  # its own weights, or the LoRA policy's, adapters off
            ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=cfg.temperature,
                                             chunk=cfg.logprob_chunk)
        if self.reward is None:
            scores = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
        else:
            scores = sequence_scores(self.reward, q, qm, r, rm)
        return logprobs, ref_logprobs, values, scores

    def rollout(self, query_ids: Any, query_mask: Any, *, iteration: int = 0, noise: Any = None,
                prompts: Sequence[str] | None = None, times: dict | None = None) -> RolloutBatch:
        """Sample responses and score them: a `RolloutBatch` (numpy) with extras `contains_eos`
        (and `extra/<name>` scores of `extra_rewards`)."""
        times = {} if times is None else times
        rows = self.parallel.local_rows(len(query_ids))  # this rank's rows (all of them on one process)
        query_ids, query_mask = query_ids[rows], query_mask[rows]
        noise, prompts = (None if x is None else x[rows] for x in (noise, prompts))
        with metrics.phase_timer(times, "time/generate_s", block=self._sync):
            gen = self.generate(query_ids, query_mask, iteration=iteration, noise=noise)
        q, qm = self._tensor(query_ids), self._tensor(query_mask)
        r, rm = gen.response_ids.long(), gen.response_mask.long()
        with metrics.phase_timer(times, "time/forward_s", block=self._sync):
            logprobs, ref_logprobs, values, scores = self._rollout_forward(q, qm, r, rm)
        arrays = dict(query_ids=q, query_mask=qm, response_ids=r, response_mask=rm,
                      logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores)
        with metrics.phase_timer(times, "time/reward_s"):
            batch = self.parallel.gather_rollout(self._finish_rollout(arrays, prompts))
        return batch

    # ---- 4. rewards -> advantages ------------------------------------------------------------
    @torch.no_grad()
    def _advantages(self, scores, logprobs, ref_logprobs, values, mask, kl_coef):
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
            seq_return = torch.where(real, rewards, 0.0).sum(-1)
            per_seq = group_advantages(seq_return, cfg.num_generations, est)
            advantages = torch.where(real, per_seq[:, None], 0.0)
            returns = torch.where(real, seq_return[:, None], 0.0)
        return dict(rewards=rewards, kl=kl, advantages=advantages, returns=returns,
                    kl_for_controller=kl_for_controller(kl, mask, units=cfg.kl_units))

    def compute_advantages(self, batch: Mapping[str, Any], kl_coef: float) -> dict[str, Tensor]:
        b = {k: self._tensor(batch[k]) for k in ("scores", "logprobs", "ref_logprobs", "values", "response_mask")}
        return self._advantages(b["scores"], b["logprobs"], b["ref_logprobs"], b["values"],
                                b["response_mask"],
                                torch.tensor(kl_coef, dtype=b["logprobs"].dtype, device=self.device))

    # ---- 5. the update phase: K epochs x M minibatches ----------------------------------------
    def _loss(self, mb, weight):
        cfg = self.config
        policy, critic = map(self.parallel.training_view, self._models())
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
            entropy = entropy.detach()  # a statistic only: no backward through it
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
        return loss * weight, {k: v.detach() for k, v in stats.items()}

    def _minibatch_grads(self, batch, idx, position=(0, 0)):
        """Backward of one minibatch (rows `idx`), summed over its micro-batches; returns stats.
        Distributed: this rank's rows of the minibatch, weighted within the whole minibatch.
        `position` (iteration, minibatch step): LoRA dropout's masks of micro-batch i are drawn
        from `seeds.dropout_seed(seed, iteration, step, i, rank)` (forward and backward)."""
        cfg = self.config
        micro = idx[self.parallel.local_rows(len(idx))].reshape(cfg.grad_accum_steps, -1)
        total = aggregation_count(batch["response_mask"][idx], cfg.loss_agg)
        acc: dict[str, Tensor] = {}
        for i, rows in enumerate(micro):
            mb = {k: v[rows] for k, v in batch.items()}
            w = microbatch_weight(mb["response_mask"], cfg.loss_agg, total)
            seed = seeds.dropout_seed(cfg.seed, *position, i, self.parallel.rank)
            with adapter_dropout([m for m in self._models() if m is not None], seed):
                loss, stats = self._loss(mb, w)
                with self.parallel.grad_sync(last=i == len(micro) - 1):
                    self.parallel.scale_loss(loss).backward()
            if cfg.grad_accum_steps == 1 and self.parallel.count == 1:
                return stats
            for k, v in stats.items():
                if k in _MAX_STATS:
                    acc[k] = torch.maximum(acc[k], v) if k in acc else v
                elif k in _MIN_STATS:
                    acc[k] = torch.minimum(acc[k], v) if k in acc else v
                else:
                    acc[k] = acc.get(k, 0.0) + w * v
        return self.parallel.reduce_stats(acc, _MAX_STATS, _MIN_STATS)

    def update(self, batch: Mapping[str, Any], iteration: int = 0) -> dict[str, np.ndarray]:
        """K epochs x M minibatches on a batch holding the rollout tensors plus `advantages` and
        `returns`. Returns the per-step stats as numpy arrays [K * M]."""
        cfg = self.config
        rows = seeds.minibatch_indices(cfg.seed, iteration, batch_size=cfg.rollout_size,
                                      ppo_epochs=cfg.ppo_epochs, num_minibatches=cfg.num_minibatches)
        batch = {k: self._tensor(batch[k]) for k in update_keys(cfg)}
        params = self._trainable()
        steps = []
        for j, idx in enumerate(torch.from_numpy(rows).to(self.device)):
            self.optimizer.zero_grad(set_to_none=True)
            stats = self._minibatch_grads(batch, idx, (iteration, j))
            # one global-norm clip, AdamW; a non-finite loss or gradient skips this step
            grad_norm, ok = guarded_step(self.optimizer, params, stats["loss/total"],
                                         max_grad_norm=cfg.max_grad_norm)
            steps.append({**stats, "policy/grad_norm": grad_norm.detach(),
                          "update/skipped": torch.tensor(not ok)})
        self.optimizer.zero_grad(set_to_none=True)
        return {k: torch.stack([s[k] for s in steps]).cpu().numpy() for k in steps[0]}

    # ---- one whole iteration ----------------------------------------------------------------
    def step(self, iteration: int | None = None, *, prompts: Sequence[str] | None = None,
             query_ids: Any = None, query_mask: Any = None, noise: Any = None) -> dict[str, float]:
        """One PPO iteration on `prompts` (default: the next batch of the prompt stream) or on
        pre-tokenised left-padded `query_ids`/`query_mask`. Returns its stats."""
        cfg = self.config
        iteration = self.iteration if iteration is None else iteration
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        prompts, query_ids, query_mask = self._prompts_for(iteration, prompts, query_ids, query_mask)
        batch = self.rollout(query_ids, query_mask, iteration=iteration, noise=noise,
                             prompts=prompts, times=times)
        arrays = {k: self._tensor(v) for k, v in batch.arrays().items() if not k.startswith("extra/")}
        kl_coef = self.kl_ctl.value
        with metrics.phase_timer(times, "time/advantages_s", block=self._sync):
            adv = self.compute_advantages(arrays, kl_coef)
        with metrics.phase_timer(times, "time/update_s"):
            update_stats = self.update({**arrays, **adv}, iteration)
        adv = {k: v.cpu().numpy() for k, v in adv.items()}
        self.kl_ctl.update(adv["kl_for_controller"], cfg.rollout_size)
        self.iteration = iteration + 1
        times["time/iteration_s"] = time.perf_counter() - t0
        return self._collect_stats(iteration, batch, adv, update_stats, kl_coef, times)

    # ---- weights out ---------------------------------------------------------------------------
    def save_policy(self, path: str | os.PathLike, *, merge: bool = False) -> None:
        """The current policy in Hugging Face format (loads in `transformers` and both backends);
        with LoRA on the policy, its PEFT adapter (`lora.save_adapter`: adapter_config.json,
        whose base_model_name_or_path is the policy's base checkpoint dir, and
        adapter_model.safetensors; `peft` and both backends' `load_adapter` read it) -- or with
        merge=True the full checkpoint of the adapters merged into the base (`merge_adapters`)."""
        from ppo_torch.models import save_pretrained
        from ppo_torch.models.lora import merge_adapters, save_adapter

        model = self.parallel.full_model(self.policy)  # FSDP2: all ranks gather ...
        if self.processes.is_main:                 # ... and rank 0 writes
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
        from ppo_torch.models import save_pretrained
        from ppo_torch.models.lora import merge_adapters

        model = self.parallel.full_model(self._critic_to_save())
        if self.processes.is_main:
            save_pretrained(merge_adapters(model) if model_options(model).lora else model, path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        from ppo_torch.checkpoint import save_trainer_state

        save_trainer_state(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        from ppo_torch.checkpoint import load_trainer_state

        load_trainer_state(self, path)

    def _tensor(self, x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.to(self.device)
        x = np.asarray(x)
        t = torch.from_numpy(np.array(x, copy=True))
        return (t.long() if np.issubdtype(x.dtype, np.integer) else t).to(self.device)

    def _to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


__all__ = ["PPOTrainer", "microbatch_weight"]
