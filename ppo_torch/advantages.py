"""Reward shaping, GAE, whitening and the KL the controller sees, in PyTorch.
Mirror: `ppo_jax/advantages.py`.

Conventions (shared with every function in `losses.py`): tensors are [B, T] over response
tokens, `mask` is 1 on real tokens -- a contiguous block per row, normally a prefix ending at
EOS -- and padded positions are ignored even if they hold NaN.
"""

from __future__ import annotations

import torch

from ppo_rlhf.checks import check_choice, check_contiguous_rows, check_leading_dim, check_same_shape
from ppo_rlhf.config import KL_UNITS
from ppo_torch.losses import kl_penalty
from ppo_torch.masked import _bool_mask, _clean, _float, last_token_index, masked_mean, masked_sum, whiten

Tensor = torch.Tensor

__all__ = [
    "last_token_index", "shape_rewards", "gae", "whiten", "kl_for_controller",
]


def shape_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                  kl_coef: float | Tensor, *, kl_estimator: str = "k1") -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: r_t = -kl_coef * KL_t on every real token, plus the sample's score
    on its last real token (the EOS when the response has one). Returns (rewards, kl), both [B, T]
    and 0 on padding; `kl` is the per-token estimate (kind `kl_estimator`) before the coefficient."""
    fn = "shape_rewards"
    check_same_shape(fn, "logprobs", logprobs.shape, ref_logprobs=ref_logprobs, mask=mask)
    check_leading_dim(fn, "scores", scores, logprobs.shape[0])
    mask = _bool_mask(fn, mask)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator, mask=mask)
    rewards = -kl_coef * kl
    last = torch.nn.functional.one_hot(last_token_index(mask), mask.shape[-1]).to(rewards.dtype)
    has_tokens = mask.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = rewards + torch.where(has_tokens & (last > 0), _float(scores).to(rewards.device)[:, None], zero)
    return torch.where(mask, rewards, zero), kl


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), a reverse loop over time:
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    where the step after the last real token is terminal (V = 0, A = 0 there). The real tokens
    of each row must be one contiguous block (checked when the mask is concrete). Returns
    (advantages, returns = advantages + values), both 0 on padding."""
    fn = "gae"
    check_same_shape(fn, "rewards", rewards.shape, values=values, mask=mask)
    if torch.as_tensor(mask).device.type == "cpu" and not torch.compiler.is_compiling():
        check_contiguous_rows(fn, torch.as_tensor(mask).numpy())
    mask = _bool_mask(fn, mask)
    rewards, values = _clean(rewards, mask), _clean(values, mask)
    # V_{t+1}, and whether step t+1 exists (is a real token); the step after the end is terminal.
    next_real = torch.nn.functional.pad(mask[:, 1:], (0, 1)).to(values.dtype)
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1)) * next_real
    deltas = rewards + gamma * next_values - values

    adv_reversed = []
    next_adv = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(deltas.shape[1])):
        next_adv = deltas[:, t] + gamma * lam * next_real[:, t] * next_adv
        adv_reversed.append(next_adv)
    advantages = torch.stack(adv_reversed[::-1], dim=1)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    advantages = torch.where(mask, advantages, zero)
    return advantages, torch.where(mask, advantages + values, zero)


def kl_for_controller(kl: Tensor, mask: Tensor, *, units: str = "seq-sum") -> Tensor:
    """The rollout KL in the units the adaptive controller compares with its target:
    "seq-sum" = mean over samples of each sample's summed per-token KL (Ziegler et al.);
    "token-mean" = mean over all real tokens."""
    check_choice("kl_for_controller", "units", units, KL_UNITS)
    if units == "token-mean":
        return masked_mean(kl, mask)
    return masked_sum(kl, mask, axis=-1).mean()
