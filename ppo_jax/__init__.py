"""ppo_jax: the jit-compiled JAX/Flax NNX core of ppo-rlhf (mirror of ppo_torch)."""
