"""The PyTorch core as the application sees it (`ppo_rlhf.backend.Backend`)."""

from __future__ import annotations

from typing import Any

import torch

from ppo_rlhf.backend import Backend
from ppo_torch.evaluate import sample_and_score
from ppo_torch.models import load_pretrained, load_scalar_model
from ppo_torch.parallel import shutdown
from ppo_torch.ppo import PPOTrainer
from ppo_torch.reward_model import RewardModelTrainer
from ppo_torch.sample_text import sample_texts
from ppo_torch.sft import SFTTrainer


def _for_sampling(model: Any) -> Any:
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


BACKEND = Backend(
    name="torch", PPOTrainer=PPOTrainer, RewardModelTrainer=RewardModelTrainer, SFTTrainer=SFTTrainer,
    load_pretrained=load_pretrained, load_scalar_model=load_scalar_model, sample_texts=sample_texts,
    sample_and_score=sample_and_score, for_sampling=_for_sampling,
    scale_out="torchrun", leave_processes=shutdown)

__all__ = ["BACKEND"]
