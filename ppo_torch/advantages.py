"""Reward shaping, GAE, whitening and the KL the controller sees, in PyTorch.
Mirror: `ppo_jax/advantages.py`.

Conventions (shared with every function in `losses.py`): tensors are [B, T] over response
tokens, `mask` is 1 on real tokens -- a contiguous block per row, normally a prefix ending at
EOS -- and padded positions are ignored even if they hold NaN.
"""

from __future__ import annotations

import torch

from ppo_rlhf.checks import check_choice, check_contiguous_rows, check_groups, check_leading_dim, check_same_shape
from ppo_rlhf.config import GROUP_ADVANTAGE_KINDS, KL_UNITS
from ppo_torch.losses import kl_penalty
from ppo_torch.masked import _bool_mask, _clean, _float, last_token_index, masked_mean, masked_sum, whiten

Tensor = torch.Tensor

__all__ = [
    "last_token_index", "shape_rewards", "gae", "whiten", "kl_for_controller", "group_advantages",
    "reinforce_pp_returns", "reinforce_pp_baseline",
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


def group_advantages(scores: Tensor, num_generations: int, kind: str, *, eps: float = 1e-6) -> Tensor:
    """One advantage per sequence from the scores of its group: the G = `num_generations` samples
    of one prompt. `scores` is [num_prompts * G], each prompt's samples adjacent (sample j of
    prompt p at p * G + j); the result has the same layout.
      "grpo":    (s_i - mean_g) / (std_g + eps), std_g the unbiased group std (divisor G - 1)
      "dr_grpo": s_i - mean_g (no std division; Dr. GRPO)
      "rloo":    s_i - (sum_g - s_i) / (G - 1), the mean of the other G - 1 samples
                 (= G / (G - 1) * (s_i - mean_g))
    G = 1: "grpo" and "dr_grpo" give 0 (a lone sample is its own group mean, with no spread);
    "rloo" is an error (there is no other sample to be the baseline). A group of equal scores
    gives 0 for every kind.
    The std is the unbiased one (torch.std's default), as in TRL, verl and OpenRLHF, so that an
    advantage scale, and the learning rate and clip range tuned for it, carry over from those
    peers; the population std would make every advantage sqrt(G / (G - 1)) times larger (1.15x
    at G = 4). Float32 at least, like every function here."""
    fn = "group_advantages"
    check_choice(fn, "kind", kind, GROUP_ADVANTAGE_KINDS)
    check_groups(fn, scores, num_generations)
    if kind == "rloo" and num_generations < 2:
        raise ValueError(f"{fn}: kind='rloo' needs num_generations >= 2 (a leave-one-out baseline "
                         f"needs another sample of the prompt), got {num_generations}")
    s = _float(scores).reshape(-1, num_generations)
    centred = s - s.mean(dim=-1, keepdim=True)
    if kind == "dr_grpo":
        out = centred
    elif kind == "rloo":
        out = s - (s.sum(dim=-1, keepdim=True) - s) / (num_generations - 1)
    else:
        var = centred.pow(2).sum(dim=-1, keepdim=True) / max(num_generations - 1, 1)
        out = centred / (var.sqrt() + eps)
    return out.reshape(-1)


def reinforce_pp_returns(rewards: Tensor, mask: Tensor, *, gamma: float) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025; OpenRLHF's "reinforce", verl's "reinforce_plus_plus"): per-token
    rewards -- `shape_rewards`' output, the KL penalty on every token and the score on the last --
    summed to go, G_t = r_t + gamma * G_{t+1} over each row's real tokens (its contiguous block;
    terminal after the last), then whitened over every real token of the batch:
    A_t = (G_t - mean) / sqrt(var + 1e-8), population variance (`whiten`; OpenRLHF clamps the
    variance at 1e-8 instead of adding it). Returns (advantages, returns = G), 0 on padding."""
    fn = "reinforce_pp_returns"
    check_same_shape(fn, "rewards", rewards.shape, mask=mask)
    mask = _bool_mask(fn, mask)
    if torch.as_tensor(mask).device.type == "cpu" and not torch.compiler.is_compiling():
        check_contiguous_rows(fn, torch.as_tensor(mask).numpy())
    returns, _ = gae(rewards, torch.zeros_like(_float(rewards)), mask, gamma=gamma, lam=1.0)
    return whiten(returns, mask), returns


def reinforce_pp_baseline(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                          kl_coef: float | Tensor, *, num_generations: int, gamma: float,
                          kl_estimator: str = "k1") -> tuple[Tensor, Tensor, Tensor]:
    """REINFORCE++-baseline (OpenRLHF's "reinforce_baseline"): each score minus its group's mean
    (`group_advantages(..., "dr_grpo")`) before the KL shaping (`shape_rewards`), then
    `reinforce_pp_returns`. Returns (advantages, returns, kl), like shape_rewards' kl.
    num_generations = 1 is an error: a lone sample is its own group mean, so no score would remain."""
    if num_generations == 1:
        raise ValueError("reinforce_pp_baseline: num_generations=1 leaves no score (each sample is "
                         "its own group mean); allowed >= 2, or reinforce_pp_returns without a baseline")
    centred = group_advantages(scores, num_generations, "dr_grpo")
    rewards, kl = shape_rewards(centred, logprobs, ref_logprobs, mask, kl_coef, kl_estimator=kl_estimator)
    advantages, returns = reinforce_pp_returns(rewards, mask, gamma=gamma)
    return advantages, returns, kl
