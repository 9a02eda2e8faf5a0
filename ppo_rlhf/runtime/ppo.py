"""The host side of PPO that both trainers share (backend-neutral, numpy only).

The backend files (`ppo_jax/ppo.py`, `ppo_torch/ppo.py`) hold the math of an iteration; this base
class holds what is the same in both and touches no array library: the roles' tokenizer checks,
prompts (the seeded prompt stream, tokenisation), host-side rewards, the missing-EOS penalty, the
iteration's stats under TRL's names, and `train()` -- the iterations run through the one host loop,
which the trainer owns (`self.loop`, a `ppo_rlhf.runtime.loop.HostLoop`: metrics, progress,
checkpoints, resume, signals, the non-finite-update guard).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ppo_rlhf import tokens
from ppo_rlhf.config import PPOConfig
from ppo_rlhf.errors import UsageError
from ppo_rlhf.kl_control import make_kl_controller
from ppo_rlhf.rewards import RewardModel, ScoreRequest, check_scores
from ppo_rlhf.rollout import RolloutBatch
from ppo_rlhf.runtime import seeds
from ppo_rlhf.runtime.loop import HostLoop, LoopCounter, fmt
from ppo_rlhf.runtime.processes import SINGLE_PROCESS, Processes
from ppo_rlhf.runtime.roles import ModelKit, Roles, compose_roles

_FROM_TOKENIZER = -1


def update_keys(config: PPOConfig) -> tuple[str, ...]:
    """The rollout arrays the update reads: the reference's log-probs only for a KL term in the
    loss (`kl_loss_coef`)."""
    keys = ("query_ids", "query_mask", "response_ids", "response_mask", "logprobs", "values",
            "advantages", "returns")
    return keys + (("ref_logprobs",) if config.kl_loss_coef else ())


class TrainerBase:
    """The PPO trainer's host side; the backend subclass (`PPOTrainer`) places the roles that
    `_compose_roles` builds and supplies the rollout's device work, `compute_advantages`,
    `update`, `step`, `_to_numpy` and the checkpoint tensors."""

    backend = "?"  # the backend subclass's name

    def __init__(self, policy: Any, prompts: Any, *, config: PPOConfig, tokenizer: Any,
                 out_dir: Any, extra_rewards: Mapping[str, Callable] | None, eos_token_id: Any,
                 pad_token_id: Any, checkpoint_every: int, keep_checkpoints: int):
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.processes: Processes = SINGLE_PROCESS  # the backend's, under a mesh / torchrun
        self.history: list[dict[str, Any]] = []  # the stats of every iteration this trainer ran
        self.loop = HostLoop(self, counter="iteration", counter_offset=1, config_file="config.json",
                             checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints)
        # the policy's checkpoint dir (None for a model object): a LoRA policy's saved adapter
        # points to it as its base (`adapter_config.json`'s base_model_name_or_path)
        self.policy_source = (str(Path(policy).absolute()) if isinstance(policy, (str, os.PathLike))
                              else None)
        self.tokenizer = tokenizer = tokens.resolve_tokenizer(tokenizer, policy)
        pad, eos = tokens.pad_and_eos(tokenizer)
        self.eos_token_id = eos if eos_token_id == _FROM_TOKENIZER else eos_token_id
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (pad or 0))
        if isinstance(prompts, (str, os.PathLike)):
            from ppo_rlhf.data import load_prompts

            prompts = load_prompts(prompts)
        self.prompt_stream = (None if prompts is None
                              else seeds.PromptStream(prompts, config.batch_size, seed=config.seed))
        self.extra_rewards = dict(extra_rewards or {})
        self.kl_ctl = make_kl_controller(config)
        self._warned_eos = False  # the missing-EOS warning is given once per trainer
        # set by _compose_roles: what the host side needs to know of the roles
        self.host_reward: RewardModel | None = None  # a reward scored on the host, if any
        self.scores_on_device = False  # a reward model of the core scores the rollouts
        self.shared_trunk = False  # the critic is a value head on the policy's trunk

    def _compose_roles(self, kit: ModelKit, policy: Any, reward: Any, *, reference: Any, critic: Any,
                       dtype: Any) -> Roles:
        """The roles built from the trainer's arguments (`ppo_rlhf.runtime.roles`), checked
        against the tokenizer before and after loading; the backend places them and keeps no
        other reference to them (a trained model's first parameters would stay alive)."""
        for role, path in (("reward model", reward), ("reference", reference), ("critic", critic)):
            tokens.check_same_tokenizer(self.tokenizer, path, role)  # dirs only: before loading
        roles = compose_roles(kit, policy, reward, config=self.config, reference=reference,
                              critic=critic, dtype=dtype)
        self._check_models(*roles.models())
        self.host_reward = roles.host_reward
        self.scores_on_device = roles.reward_model is not None
        self.shared_trunk = roles.shared_trunk
        return roles

    def _critic_to_save(self) -> Any:
        critic = self.critic_model()
        if critic is None:
            raise UsageError(f"advantage_estimator={self.config.advantage_estimator!r} trains no critic: "
                             f"there is none to save")
        return critic

    def critic_model(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_numpy(self, x: Any) -> np.ndarray:  # pragma: no cover - abstract
        """A device array of the rollout as numpy (the backend's)."""
        raise NotImplementedError

    def _check_models(self, *models: Any) -> None:
        """All roles (policy, reference, critic, reward model) share one vocabulary, the
        tokenizer's ids fit it and prompt + response fit GPT-2's learned positions. (A reward
        model with another tokenizer is refused rather than re-tokenised through text: wrap it
        in a `RewardFn` that tokenises the decoded text itself if that is what you want.)"""
        roles = ("policy", "reference", "critic", "reward model")
        tokens.check_vocab(self.tokenizer, {role: m.config.vocab_size for role, m in zip(roles, models)
                                     if m is not None})
        cfg = self.config
        tokens.check_positions(cfg.max_prompt_len + cfg.max_new_tokens,
                        f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len} + {cfg.max_new_tokens}",
                        "lower them (PPOConfig / --set)", [m.config for m in models if m is not None])

    # ---- prompts ---------------------------------------------------------------------------------
    def _prompts_for(self, iteration: int, prompts: Sequence[str] | None, query_ids: Any,
                     query_mask: Any) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
        """The iteration's batch_size prompts (given, or the prompt stream's), tokenised, each
        repeated num_generations times in adjacent rows: what the rollout samples from."""
        cfg = self.config
        if query_ids is not None:
            if query_mask is None:
                raise ValueError("query_ids given without query_mask")
            q, qm = np.asarray(query_ids, np.int32), np.asarray(query_mask, np.int32)
            if q.shape != (cfg.batch_size, cfg.max_prompt_len):
                raise ValueError(f"query_ids must have shape (batch_size, max_prompt_len) = "
                                 f"({cfg.batch_size}, {cfg.max_prompt_len}), got {q.shape}")
            prompts = list(prompts) if prompts is not None else None
        else:
            if prompts is None:
                if self.prompt_stream is None:
                    raise ValueError("no prompts: pass prompts= to the trainer or to step()")
                prompts = self.prompt_stream.batch(iteration)
            prompts = list(prompts)
            if len(prompts) != cfg.batch_size:
                raise ValueError(f"step() needs batch_size={cfg.batch_size} prompts, got {len(prompts)}")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer= to the trainer")
            q, qm, _ = tokens.tokenize_prompts(self.tokenizer, prompts, cfg.max_prompt_len)
        G = cfg.num_generations
        if G > 1:  # the group of each prompt: G adjacent rows
            q, qm = np.repeat(q, G, axis=0), np.repeat(qm, G, axis=0)
            prompts = None if prompts is None else [p for p in prompts for _ in range(G)]
        return prompts, q, qm

    # ---- rollout: host rewards, missing-EOS penalty, extras ----------------------------------------
    def _finish_rollout(self, arrays: Mapping[str, Any], prompts: Sequence[str] | None) -> RolloutBatch:
        cfg = self.config
        a = {k: self._to_numpy(v) for k, v in arrays.items()}
        n = len(a["response_ids"])  # batch_size, or this rank's share of it (torch distributed)
        texts = None
        if self.tokenizer is not None and (self.host_reward is not None or self.extra_rewards):
            texts = tokens.decode_responses(self.tokenizer, a["response_ids"], a["response_mask"])
            if prompts is None:
                prompts = tokens.decode_responses(self.tokenizer, a["query_ids"], a["query_mask"])
        if self.host_reward is not None:
            request = ScoreRequest(a["query_ids"], a["query_mask"], a["response_ids"],
                                   a["response_mask"], prompts=prompts, responses=texts)
            a["scores"] = check_scores(self.host_reward.score(request), n, source="reward")
        has_eos = tokens.contains_eos(a["response_ids"], a["response_mask"], self.eos_token_id)
        if (cfg.missing_eos_penalty is None and self.eos_token_id is not None
                and self.scores_on_device and not has_eos.all() and not self._warned_eos):
            self._warned_eos = True
            warnings.warn(f"{int((~has_eos).sum())} of {n} responses end without EOS and are scored "
                          f"by a reward model that was trained on EOS-terminated text; set "
                          f"missing_eos_penalty (e.g. 1.0, as TRL) to penalise them", stacklevel=3)
        if cfg.missing_eos_penalty is not None and self.eos_token_id is not None:
            penalised = a["scores"] - cfg.missing_eos_penalty
            a["scores"] = np.where(has_eos, a["scores"], penalised).astype(a["scores"].dtype)
        extras = {"contains_eos": has_eos.astype(np.int32)}
        for name, fn in self.extra_rewards.items():
            if texts is None:
                raise ValueError(f"extra reward {name!r} scores text: the trainer needs a tokenizer")
            extras[f"extra/{name}"] = check_scores(fn(list(prompts), texts), n,
                                                   source=f"extra reward {name!r}")
        # float64 models (numerics checks) keep their float64 rollouts; otherwise float32
        return RolloutBatch.from_arrays({**a, **extras}, float_dtype=str(a["logprobs"].dtype))

    # ---- stats -----------------------------------------------------------------------------------
    def _collect_stats(self, iteration: int, batch: RolloutBatch, adv: Mapping[str, Any],
                       update: Mapping[str, np.ndarray], kl_coef: float,
                       times: Mapping[str, float]) -> dict[str, float]:
        cfg = self.config
        mask = batch.response_mask.astype(bool)
        kl = np.where(mask, np.asarray(adv["kl"], np.float64), 0.0)  # stats in float64
        scores = batch.scores.astype(np.float64)
        seq_kl = kl.sum(1)
        non_score = (-kl_coef * seq_kl)
        skipped = np.asarray(update["update/skipped"]).astype(bool)
        self.loop.bad_updates.record(skipped.tolist(), f"iteration {iteration}")
        s: dict[str, float] = {
            "iteration": iteration,
            "episode": (iteration + 1) * cfg.rollout_size,
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float((-np.where(mask, batch.logprobs.astype(np.float64), 0.0).sum(1)).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((scores + non_score).mean()),
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()),
            "objective/kl_coef": float(kl_coef),
            "gen/response_len_mean": float(mask.sum(1).mean()),
            "gen/eos_frac": float(batch.extras["contains_eos"].mean()),
            "val/returns_mean": float(np.asarray(adv["returns"], np.float64)[mask].mean()),
            "val/advantages_mean": float(np.asarray(adv["advantages"], np.float64)[mask].mean()),
            "update/skipped": int(skipped.sum()),
        }
        for k, v in batch.extras.items():
            if k.startswith("extra/"):
                s["objective/" + k[len("extra/"):]] = float(np.mean(v, dtype=np.float64))
        for k, v in update.items():
            v = np.asarray(v, np.float64)
            if k == "update/skipped":
                continue
            if k.endswith("_max"):
                s[k] = float(v.max())
            elif k.endswith("_min"):
                s[k] = float(v.min())
            elif k == "val/ratio":
                s[k] = float(v.mean())
                s["val/ratio_var"] = float(v.var())
            else:
                s[k + "_avg"] = float(v.mean())
        s.update({k: float(v) for k, v in times.items()})
        n_tokens = cfg.rollout_size * (cfg.max_prompt_len + cfg.max_new_tokens)
        s["time/tokens_per_s"] = n_tokens / max(times.get("time/iteration_s", 0.0), 1e-9)
        self.history.append(s)
        return s

    # ---- the training loop ---------------------------------------------------------------------
    iteration = LoopCounter("Iterations done (the loop's counter): the index of the next one.")

    def extra_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value}

    def restore_extra_state(self, state: Mapping[str, Any]) -> None:
        self.kl_ctl.load_state_dict({"value": state["kl_coef"]})

    def train(self, num_iterations: int | None = None, *, resume: bool = False,
              progress: bool = True, on_iteration: Callable[[dict], None] | None = None,
              report_to: str = "none") -> list[dict]:
        """Run PPO until `num_iterations` (default config.num_iterations) iterations are done in
        total, through the host loop (`ppo_rlhf.runtime.loop`): out_dir/metrics.jsonl,
        checkpoints every `checkpoint_every` iterations and at the end, SIGTERM/SIGINT finish the
        current iteration, checkpoint and return. With resume=True, continue from the newest
        valid checkpoint. report_to="tensorboard": the stats also as TensorBoard scalars under
        out_dir/tensorboard (`runtime/tracking.py`). Returns the stats of every iteration run."""
        total = self.config.num_iterations if num_iterations is None else int(num_iterations)
        self.loop.run(total, self.step, resume=resume, progress=progress, on_record=on_iteration,
                      desc=f"PPO ({self.backend})", report_to=report_to,
                      postfix=lambda s: {"score": fmt(s["objective/scores"]), "kl": fmt(s["objective/kl"])})
        return self.history

    def _save_tokenizer(self, path: str | os.PathLike) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))
