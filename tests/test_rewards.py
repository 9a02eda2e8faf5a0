"""Reward protocols: any conforming object is accepted; bad outputs get clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import NonFiniteRewardError, ScoreRequest, as_reward_model, check_scores
from ppo_rlhf.rewards import RewardFn, RewardModel, TextRewardModel, load_reward_fn


def _req(n=3, text=True):
    z = np.zeros((n, 2), np.int32)
    return ScoreRequest(z, z + 1, z, z + 1, prompts=["p"] * n if text else None,
                        responses=["a", "bb", "ccc"][:n] if text else None)


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


class IdsModel:
    def score(self, request):
        return request.response_mask.sum(axis=1).astype(np.float32)


def test_protocols_and_adapter():
    assert isinstance(length_reward, RewardFn) and isinstance(IdsModel(), RewardModel)
    np.testing.assert_array_equal(as_reward_model(length_reward).score(_req()), [1, 2, 3])
    m = IdsModel()
    assert as_reward_model(m) is m
    with pytest.raises(TypeError, match="a reward must be a RewardFn"):
        as_reward_model(42)


def test_text_reward_needs_text():
    with pytest.raises(ValueError, match="scores text, but no tokenizer was given"):
        TextRewardModel(length_reward).score(_req(text=False))


def test_check_scores():
    assert check_scores([1, 2], 2).dtype == np.float32
    with pytest.raises(ValueError, match=r"returned \(3,\) scores for a batch of 2"):
        check_scores([1, 2, 3], 2)
    with pytest.raises(NonFiniteRewardError, match=r"non-finite scores \(nan\) for 1 of 3 samples \(first: sample 1\)"):
        check_scores([0.0, float("nan"), 1.0], 3)
    with pytest.raises(TypeError, match="one number per sample"):
        check_scores(["a", object()], 2)


def test_load_reward_fn():
    fn = load_reward_fn("tests.test_rewards:length_reward")
    assert fn(["p"], ["xy"]) == [2.0]
    for spec, msg in [("nocolon", "must be given as 'module:function'"),
                      ("no_such_module_xyz:f", "cannot import module"),
                      ("tests.test_rewards:nope", "has no attribute 'nope'")]:
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(spec)
