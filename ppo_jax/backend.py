"""The JAX core as the application sees it (`ppo_rlhf.backend.Backend`)."""

from __future__ import annotations

from ppo_jax import plan as planner
from ppo_jax.evaluate import sample_and_score
from ppo_jax.models import load_pretrained, load_scalar_model
from ppo_jax.parallel import initialize_distributed
from ppo_jax.ppo import PPOTrainer
from ppo_jax.reward_model import RewardModelTrainer
from ppo_jax.sample_text import sample_texts
from ppo_jax.sft import SFTTrainer
from ppo_rlhf.backend import Backend
from ppo_rlhf.runtime.compile_cache import enable_jax_compile_cache

BACKEND = Backend(
    name="jax", PPOTrainer=PPOTrainer, RewardModelTrainer=RewardModelTrainer, SFTTrainer=SFTTrainer,
    load_pretrained=load_pretrained, load_scalar_model=load_scalar_model, sample_texts=sample_texts,
    sample_and_score=sample_and_score,
    for_sampling=lambda model: model,  # arrays live where jax put them (its default device)
    scale_out="mesh", join_processes=initialize_distributed, enable_compile_cache=enable_jax_compile_cache,
    planner=planner)

__all__ = ["BACKEND"]
