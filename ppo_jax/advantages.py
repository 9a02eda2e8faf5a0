"""Reward shaping, GAE, whitening and the KL the controller sees, in JAX.
Mirror: `ppo_torch/advantages.py`.

Conventions (shared with every function in `losses.py`): arrays are [B, T] over response tokens,
`mask` is 1 on real tokens -- a contiguous block per row, normally a prefix ending at EOS -- and
padded positions are ignored even if they hold NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ppo_jax.losses import kl_penalty
from ppo_jax.masked import _bool_mask, _clean, _float, last_token_index, masked_mean, masked_sum, whiten
from ppo_rlhf.checks import check_choice, check_contiguous_rows, check_leading_dim, check_same_shape
from ppo_rlhf.config import KL_UNITS

Array = jax.Array

__all__ = [
    "last_token_index", "shape_rewards", "gae", "whiten", "kl_for_controller",
]


def shape_rewards(scores: Array, logprobs: Array, ref_logprobs: Array, mask: Array,
                  kl_coef: float | Array, *, kl_estimator: str = "k1") -> tuple[Array, Array]:
    """Per-token RLHF rewards: r_t = -kl_coef * KL_t on every real token, plus the sample's score
    on its last real token (the EOS when the response has one). Returns (rewards, kl), both [B, T]
    and 0 on padding; `kl` is the per-token estimate (kind `kl_estimator`) before the coefficient."""
    fn = "shape_rewards"
    check_same_shape(fn, "logprobs", logprobs.shape, ref_logprobs=ref_logprobs, mask=mask)
    check_leading_dim(fn, "scores", scores, logprobs.shape[0])
    mask = _bool_mask(fn, mask)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator, mask=mask)
    rewards = -kl_coef * kl
    last = jax.nn.one_hot(last_token_index(mask), mask.shape[-1], dtype=rewards.dtype)
    has_tokens = jnp.any(mask, axis=-1, keepdims=True)
    rewards = rewards + jnp.where(has_tokens & (last > 0), _float(scores)[:, None], 0.0)
    return jnp.where(mask, rewards, 0.0), kl


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016) as a reverse `lax.scan` over time:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    where the step after the last real token is terminal (V = 0, A = 0 there). The real tokens
    of each row must be one contiguous block (checked when the mask is concrete). Returns
    (advantages, returns = advantages + values), both 0 on padding."""
    fn = "gae"
    check_same_shape(fn, "rewards", rewards.shape, values=values, mask=mask)
    if not isinstance(mask, jax.core.Tracer):
        check_contiguous_rows(fn, np.asarray(mask))
    mask = _bool_mask(fn, mask)
    rewards, values = _clean(rewards, mask), _clean(values, mask)
    # V_{t+1}, and whether step t+1 exists (is a real token); the step after the end is terminal.
    next_real = jnp.pad(mask[:, 1:], ((0, 0), (0, 1))).astype(values.dtype)
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_real
    deltas = rewards + gamma * next_values - values

    def step(next_adv, inp):
        delta_t, next_real_t = inp
        adv_t = delta_t + gamma * lam * next_real_t * next_adv
        return adv_t, adv_t

    _, adv_t_major = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), (deltas.T, next_real.T),
                                  reverse=True)
    advantages = jnp.where(mask, adv_t_major.T, 0.0)
    return advantages, jnp.where(mask, advantages + values, 0.0)


def kl_for_controller(kl: Array, mask: Array, *, units: str = "seq-sum") -> Array:
    """The rollout KL in the units the adaptive controller compares with its target:
    "seq-sum" = mean over samples of each sample's summed per-token KL (Ziegler et al.);
    "token-mean" = mean over all real tokens."""
    check_choice("kl_for_controller", "units", units, KL_UNITS)
    if units == "token-mean":
        return masked_mean(kl, mask)
    return jnp.mean(masked_sum(kl, mask, axis=-1))
