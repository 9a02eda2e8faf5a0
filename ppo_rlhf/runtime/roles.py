"""The four models of a PPO iteration -- policy, reference, critic, reward -- built once, for both
cores, from what each core's `models` package gives (`ModelKit`).

    roles = compose_roles(ppo_jax.models.KIT, "sft/", "rm/", config=PPOConfig(remat="dots"))
    roles.policy, roles.reference, roles.critic, roles.reward_model, roles.host_reward

What goes where (the trainers' arguments `policy`, `reward`, `reference`, `critic`):
  * policy: a checkpoint dir, loaded with the config's model options, or a model of the core
    (a causal LM, or a `PolicyWithValueHead`: a critic on the policy's trunk, `critic` None);
  * reference: a dir or a model; default (also when it is the policy object itself) a copy of
    the initial policy's weights, frozen -- except with LoRA on the policy (`lora_roles`), where
    the default is no model at all (`Roles.reference` None): the trainers compute the reference
    with the policy's own base weights, its adapters switched off (`adapters_disabled`), so the
    base weights are in memory once;
  * reward: a reward-model dir or the core's scalar model (`reward_model`, scored on device), or
    any `RewardModel` / `RewardFn` (`host_reward`, scored on the host from ids and text);
  * critic: a dir or a scalar model; default the reward model's weights on its scale when the
    reward is a model (TRL), else the policy's backbone (its base weights) with a fresh head
    (seeded); none at all with a critic-free estimator (`PPOConfig.uses_critic`). With "critic"
    in `lora_roles` it gets fresh adapters, and its score head is trained with them;
  * the frozen models (reference, reward model) are built without remat (never differentiated)
    and, with `config.frozen_dtype`, in that dtype; the critic keeps the trainer's dtype.
Every model is built with its role's options (`config.model_options(role)`: the LoRA fields
only for the roles of `lora_roles`; `ppo_rlhf.config.ModelOptions`); a model
passed in was built by the caller, and must have been built with them (a `UsageError` says
which option differs) -- nothing here changes a model it was given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ppo_rlhf.config import ModelOptions, PPOConfig
from ppo_rlhf.errors import UsageError
from ppo_rlhf.lora import require_full_base
from ppo_rlhf.rewards import RewardModel, as_reward_model

__all__ = ["ModelKit", "Roles", "compose_roles", "check_built_with"]


@dataclass(frozen=True)
class ModelKit:
    """What building the roles asks of a core's `models` package (the same names there):

    CausalLM, PolicyWithValueHead, ScalarHeadModel   the model classes
    load_pretrained(path, dtype, *, options) / load_scalar_model(path, dtype, *, options)
    scalar_model_from_lm(lm, *, seed, options) -> a fresh-headed scalar model on lm's backbone
    critic_from_reward_model(rm, *, options) -> a trainable critic on the reward's scale
    rebuild(model, *, options, copy) -> the model built again (a frozen copy of the policy)
    cast_model(model, dtype) -> the model in another dtype (`frozen_dtype`)
    model_options(model) -> the options a model was built with
    unused_options  the `ModelOptions` fields the core has no use for (torch: scan_unroll)
    """

    CausalLM: type
    PolicyWithValueHead: type
    ScalarHeadModel: type
    load_pretrained: Callable[..., Any]
    load_scalar_model: Callable[..., Any]
    scalar_model_from_lm: Callable[..., Any]
    critic_from_reward_model: Callable[..., Any]
    rebuild: Callable[..., Any]
    cast_model: Callable[[Any, str], Any]
    model_options: Callable[[Any], ModelOptions]
    unused_options: tuple[str, ...] = ()

    @classmethod
    def of(cls, models: Any, *, unused_options: tuple[str, ...] = ()) -> "ModelKit":
        """A core's kit from its `models` package."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "unused_options"]
        return cls(*(getattr(models, n) for n in names), unused_options=unused_options)


@dataclass
class Roles:
    """The models of a PPO iteration (see the module docstring). `critic` is None with a shared
    trunk (the policy is a `PolicyWithValueHead`: `shared_trunk`) and with a critic-free
    estimator; `reference` is None when it is the LoRA policy with its adapters off; exactly one
    of `reward_model` (the core's scalar model) and `host_reward` is set."""

    policy: Any
    reference: Any
    critic: Any | None
    reward_model: Any | None
    host_reward: RewardModel | None
    shared_trunk: bool = False

    def models(self) -> tuple[Any, Any, Any | None, Any | None]:
        """(policy, reference, critic, reward model): the models, None where a role has none."""
        return self.policy, self.reference, self.critic, self.reward_model


def _is_dir_arg(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def check_built_with(kit: ModelKit, role: str, model: Any, options: ModelOptions, *,
                     frozen: bool = False) -> Any:
    """`model` (given by the caller for `role`) if it was built with `options` -- for a frozen
    role, with remat ignored; options the core does not use are ignored too -- else a UsageError
    naming the differing options and how to build it right."""
    ignored = dict.fromkeys(kit.unused_options + (("remat",) if frozen else ()), None)
    built = kit.model_options(model)
    differ = [f.name for f in dataclasses.fields(ModelOptions)
              if f.name not in ignored and getattr(built, f.name) != getattr(options, f.name)]
    if differ:
        pairs = ", ".join(f"{n}={getattr(built, n)!r} (config: {getattr(options, n)!r})" for n in differ)
        raise UsageError(f"the {role} model was built with {pairs}: options are fixed when a model "
                         f"is built -- load it with load_pretrained(..., options=config.model_options("
                         f"{role!r}){'.frozen()' if frozen else ''}) or pass its checkpoint dir")
    return model


def compose_roles(kit: ModelKit, policy: Any, reward: Any, *, config: PPOConfig, reference: Any = None,
                  critic: Any = None, dtype: Any = "float32") -> Roles:
    """The roles of a PPO trainer from its arguments (see the module docstring); the models stay
    where the loaders put them (the trainer places them)."""
    options = config.model_options("policy")
    critic_options = config.model_options("critic")
    frozen = config.model_options("reference").frozen()  # never adapters: nothing trains it
    # an adapter dir (`ppo-rlhf pretrain --lora-rank`) loads merged -- a plain model, the loaders'
    # rule for options without LoRA -- but cannot be the base of the policy's new adapters
    require_full_base(policy, "policy", options.lora)
    if _is_dir_arg(policy):
        policy = kit.load_pretrained(policy, dtype, options=options)
    elif isinstance(policy, (kit.CausalLM, kit.PolicyWithValueHead)):
        check_built_with(kit, "policy", policy, options)
    else:
        raise TypeError(f"policy must be a checkpoint dir, a CausalLM or a PolicyWithValueHead, "
                        f"got {type(policy).__name__}")
    shared_trunk = isinstance(policy, kit.PolicyWithValueHead)
    if shared_trunk and not config.uses_critic:
        raise UsageError(f"advantage_estimator={config.advantage_estimator!r} trains no critic, but the "
                         f"policy is a PolicyWithValueHead (a critic on its trunk): pass a causal LM")
    lm = policy.lm if shared_trunk else policy

    if reference is policy or reference is lm:
        reference = None  # the policy object itself: a frozen copy, else it would move with the policy
    if _is_dir_arg(reference):
        reference = kit.load_pretrained(reference, dtype, options=frozen)
    elif reference is not None:
        reference = check_built_with(kit, "reference", reference, frozen, frozen=True)
    elif not options.lora:
        reference = kit.rebuild(lm, options=frozen, copy=True)
    # else: LoRA on the policy -- the reference is its base weights with the adapters off

    reward_model = host_reward = None
    if _is_dir_arg(reward):
        if not Path(reward).is_dir():
            raise UsageError(f"reward model dir {str(reward)!r} does not exist")
        reward_model = kit.load_scalar_model(reward, dtype, options=frozen)
    elif isinstance(reward, kit.ScalarHeadModel):
        reward_model = check_built_with(kit, "reward", reward, frozen, frozen=True)
    else:
        host_reward = as_reward_model(reward)

    if shared_trunk or not config.uses_critic:
        if critic is not None and not shared_trunk:
            raise UsageError(f"critic given, but advantage_estimator={config.advantage_estimator!r} "
                             f"trains no critic")
        critic = None
    elif _is_dir_arg(critic):
        critic = kit.load_scalar_model(critic, dtype, options=critic_options)
    elif critic is not None:
        critic = check_built_with(kit, "critic", critic, critic_options)
    elif reward_model is not None:  # on the reward's scale
        critic = kit.critic_from_reward_model(reward_model, options=critic_options)
    else:
        critic = kit.scalar_model_from_lm(policy, seed=config.seed, options=critic_options)

    if config.frozen_dtype is not None:  # half their memory in bfloat16; the critic keeps dtype
        if reference is not None:  # (a LoRA policy's reference is its own weights: as they are)
            reference = kit.cast_model(reference, config.frozen_dtype)
        if reward_model is not None:
            reward_model = kit.cast_model(reward_model, config.frozen_dtype)
    return Roles(policy, reference, critic, reward_model, host_reward, shared_trunk)
