"""PPOConfig: documented defaults, validation naming the field and its allowed range, JSON."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from ppo_rlhf import PPOConfig


def test_defaults_are_valid_and_documented():
    cfg = PPOConfig()
    assert cfg.policy_loss == "clip" and cfg.loss_agg == "token-mean" and cfg.clip_eps_high is None
    src = inspect.getsource(PPOConfig)
    for f in dataclasses.fields(PPOConfig):
        # every field is followed by a docstring line in the source
        idx = src.index(f"    {f.name}:")
        nxt = src[idx:].split("\n")[1].strip()
        assert nxt.startswith('"""'), f"PPOConfig.{f.name} has no docstring"


@pytest.mark.parametrize("field,value,message", [
    ("clip_eps", 0.0, r"PPOConfig.clip_eps=0.0 is invalid: allowed a finite number in \(0.0, 1.0\)"),
    ("clip_eps", float("nan"), r"PPOConfig.clip_eps=nan is invalid"),
    ("clip_eps_high", -0.1, r"PPOConfig.clip_eps_high=-0.1 is invalid"),
    ("dual_clip", 1.0, r"PPOConfig.dual_clip=1.0 is invalid: allowed a finite number in \(1.0, inf\)"),
    ("gamma", 1.5, r"PPOConfig.gamma=1.5 is invalid: allowed a finite number in \[0.0, 1.0\]"),
    ("lam", -0.1, r"PPOConfig.lam"),
    ("kl_estimator", "k4", r"PPOConfig.kl_estimator='k4' is invalid: allowed one of 'k1', 'k2', 'k3'"),
    ("loss_agg", "mean", r"PPOConfig.loss_agg='mean' is invalid"),
    ("policy_loss", "ppo", r"PPOConfig.policy_loss='ppo'"),
    ("kl_units", "tokens", r"PPOConfig.kl_units"),
    ("kl_horizon", 0, r"PPOConfig.kl_horizon=0 is invalid: allowed an integer in \[1, inf\)"),
    ("ppo_epochs", 2.5, r"PPOConfig.ppo_epochs=2.5 is invalid: allowed an integer"),
    ("adaptive_kl", "yes", r"PPOConfig.adaptive_kl='yes' is invalid: allowed True or False"),
    ("temperature", 0.0, r"PPOConfig.temperature=0.0"),
    ("top_p", 1.5, r"PPOConfig.top_p=1.5"),
    ("num_minibatches", 3, r"PPOConfig.num_minibatches=3 is invalid: allowed a divisor of rollout_size = "
                           r"batch_size \* num_generations = 16"),
    ("num_generations", 0, r"PPOConfig.num_generations=0 is invalid: allowed an integer in \[1, inf\)"),
    ("advantage_estimator", "ppo", r"PPOConfig.advantage_estimator='ppo' is invalid: allowed one of 'gae'"),
    ("importance_level", "seq", r"PPOConfig.importance_level='seq' is invalid"),
    ("kl_loss_estimator", "k4", r"PPOConfig.kl_loss_estimator='k4' is invalid"),
    ("kl_loss_coef", -0.1, r"PPOConfig.kl_loss_coef=-0.1 is invalid"),
    ("max_grad_norm", 0.0, r"PPOConfig.max_grad_norm=0.0"),
    ("seed", -1, r"PPOConfig.seed=-1"),
    ("remat", "some", r"PPOConfig.remat='some' is invalid: allowed one of 'none', 'full', 'dots'"),
    ("scan_unroll", 1, r"PPOConfig.scan_unroll=1 is invalid: allowed True or False"),
])
def test_invalid_values_name_the_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**{field: value})


def test_grad_accum_must_divide_minibatch():
    with pytest.raises(ValueError, match=r"grad_accum_steps=3 is invalid: allowed a divisor of the minibatch size 8"):
        PPOConfig(batch_size=16, num_minibatches=2, grad_accum_steps=3)
    cfg = PPOConfig(batch_size=16, num_minibatches=2, grad_accum_steps=4)
    assert (cfg.minibatch_size, cfg.microbatch_size) == (8, 2)


def test_frozen_json_round_trip_and_unknown_fields():
    cfg = PPOConfig(clip_eps_high=0.28, adaptive_kl=True, value_clip_eps=None, extra={"note": "x"},
                    remat="dots", scan_unroll=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.clip_eps = 0.3  # type: ignore[misc]
    again = PPOConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.extra == {"note": "x"}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['clip_epsilon'\]"):
        PPOConfig.from_dict({"clip_epsilon": 0.2})
    assert cfg.replace(clip_eps=0.1).clip_eps == 0.1


def test_critic_free_fields():
    """A group baseline needs a group; a sequence ratio needs a ratio; sizes count responses."""
    cfg = PPOConfig(batch_size=4, num_generations=4, num_minibatches=8, advantage_estimator="grpo")
    assert cfg.rollout_size == 16 and cfg.minibatch_size == 2 and not cfg.uses_critic
    assert PPOConfig().uses_critic and PPOConfig(advantage_estimator="reinforce_pp").num_generations == 1
    for est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        with pytest.raises(ValueError, match=rf"num_generations=1 is invalid: allowed an integer >= 2 with "
                                             rf"advantage_estimator='{est}'"):
            PPOConfig(advantage_estimator=est)
    with pytest.raises(ValueError, match="importance_level='sequence' is invalid: allowed 'token' with "
                                         "policy_loss='pg'"):
        PPOConfig(importance_level="sequence", policy_loss="pg")
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
