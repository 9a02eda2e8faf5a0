"""ppo-rlhf: PPO-based RLHF for language models, in JAX/Flax and in PyTorch.

This package is backend-neutral: configs, the `RolloutBatch` exchange format, the reward
protocols, data formats, the demo task and the CLI. It imports neither jax nor torch at module
level; `ppo_jax` and `ppo_torch` are the two cores.
"""

from ppo_rlhf.config import PPOConfig
from ppo_rlhf.rewards import (NonFiniteRewardError, RewardFn, RewardModel, ScoreRequest,
                              TextRewardModel, as_reward_model, check_scores)
from ppo_rlhf.rollout import RolloutBatch

__version__ = "0.1.0"

__all__ = [
    "PPOConfig", "RolloutBatch", "RewardFn", "RewardModel", "ScoreRequest", "TextRewardModel",
    "NonFiniteRewardError", "as_reward_model", "check_scores", "__version__",
]
