"""ppo-rlhf: PPO-based RLHF for language models, in JAX/Flax and in PyTorch.

This package is backend-neutral; it imports neither jax nor torch at module level, and nothing in
it but the application layer (`app/`) imports `ppo_jax` or `ppo_torch`, the two cores. Its rooms:

    config.py rollout.py rewards.py errors.py   the contracts: configs, the RolloutBatch
    kl_control.py sampling.py checks.py         exchange format, reward protocols, errors, the
    hf_checkpoint.py tokens.py backend.py       KL controller, the sampling rule, argument checks
                                                of the math, the on-disk model format, tokenizer
                                                rules, the face every backend shows the app
    runtime/    the host runtime: the one training loop, checkpoints, seeds
    data/       record formats, readers and writers, batch encoding
    feedback/   human feedback: synthetic labeller, terminal tool, web annotation app
    eval/       evaluation numbers and plots
    tasks/      the demo task (reviews)
    app/        the CLI, the demo and pipelines: the only part that picks a backend
    testing.py  tiny offline checkpoints for tests, benchmarks and the demo
"""

from ppo_rlhf.config import ModelOptions, PPOConfig, RMConfig, SFTConfig
from ppo_rlhf.errors import CheckpointError, DataError, NonFiniteUpdates, UsageError
from ppo_rlhf.rewards import (
                              NonFiniteRewardError,
                              RewardFn,
                              RewardModel,
                              ScoreRequest,
                              TextRewardModel,
                              as_reward_model,
                              check_scores,
)
from ppo_rlhf.rollout import RolloutBatch

__version__ = "0.1.0"

__all__ = [
    "PPOConfig", "RMConfig", "SFTConfig", "ModelOptions", "RolloutBatch", "RewardFn", "RewardModel", "ScoreRequest",
    "TextRewardModel", "NonFiniteRewardError", "as_reward_model", "check_scores", "UsageError",
    "DataError", "CheckpointError", "NonFiniteUpdates", "__version__",
]
