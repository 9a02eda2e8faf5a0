"""ppo_torch: the reference PyTorch core of ppo-rlhf (mirror of ppo_jax)."""
