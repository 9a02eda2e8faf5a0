"""Masked reductions in PyTorch: the sums, means, variances, whitening and loss aggregation that
`losses.py` and `advantages.py` compute over real tokens only. Mirror: `ppo_jax/masked.py`.

`mask` is 1 on real tokens and 0 on padding; values at padded positions never reach a result or a
gradient, even if they are NaN or inf: each input is replaced by 0 there BEFORE any arithmetic
(`_clean`), so no NaN * 0 can leak into a gradient. Math runs in float32 at least (bfloat16 inputs
are upcast; float64 stays float64). Mask values (0/1, not all zero) are checked when reading them
is free (see `_bool_mask`).
"""

from __future__ import annotations

from typing import Any

import torch

from ppo_rlhf.checks import check_choice, check_mask, check_same_shape
from ppo_rlhf.config import LOSS_AGGS

Tensor = torch.Tensor


def _float(x: Any) -> Tensor:
    """At least float32: bf16/f16 are upcast, f64 stays f64 (for the float64 parity tests)."""
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _bool_mask(fn: str, mask: Any, *, allow_all_zero: bool = False) -> Tensor:
    """The mask as bool; its values are checked when that costs no host sync."""
    mask = torch.as_tensor(mask)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        check_mask(f"{fn}: mask", mask.detach().numpy(), allow_all_zero=allow_all_zero)
    return mask if mask.dtype == torch.bool else mask != 0


def _clean(x: Any, mask: Tensor) -> Tensor:
    """x at real positions, 0 at padded ones (so NaN padding cannot poison values or gradients)."""
    x = _float(x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, axis: int | None = None) -> Tensor:
    """Sum of x over the real positions (all positions, or along `axis`)."""
    mask = _bool_mask("masked_sum", mask, allow_all_zero=True)
    check_same_shape("masked_sum", "mask", mask.shape, x=x)
    x = _clean(x, mask)
    return x.sum() if axis is None else x.sum(dim=axis)


def masked_mean(x: Tensor, mask: Tensor, axis: int | None = None) -> Tensor:
    """Mean of x over the real positions. An all-zero mask is an error where mask values are
    checked and gives 0 otherwise (and along `axis`, a row without real tokens gives 0)."""
    mask = _bool_mask("masked_mean", mask, allow_all_zero=axis is not None)
    check_same_shape("masked_mean", "mask", mask.shape, x=x)
    x = _clean(x, mask)
    if axis is None:
        return x.sum() / mask.sum().clamp(min=1).to(x.dtype)
    return x.sum(dim=axis) / mask.sum(dim=axis).clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = False) -> Tensor:
    """Variance of x over all real positions: sum((x - mean)^2) / n, or / (n - 1) if `unbiased`
    (Bessel's correction; needs n >= 2 where mask values are checked, gives 0 for n = 1 otherwise)."""
    mask = _bool_mask("masked_var", mask)
    check_same_shape("masked_var", "mask", mask.shape, x=x)
    n = mask.sum()
    if unbiased and n.device.type == "cpu" and not torch.compiler.is_compiling() and int(n) < 2:
        raise ValueError("masked_var: unbiased variance needs at least 2 real tokens, mask has "
                         f"{int(n)}")
    x = _clean(x, mask)
    mean = x.sum() / n.clamp(min=1).to(x.dtype)
    sq = torch.where(mask, (x - mean) ** 2, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    denom = (n - 1) if unbiased else n
    return sq / denom.clamp(min=1).to(x.dtype)


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, unbiased: bool = False,
           eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the real positions; with shift_mean=False the mean is
    added back (only the scale changes, as TRL does for rewards). Padded positions come out 0."""
    mask = _bool_mask("whiten", mask)
    check_same_shape("whiten", "mask", mask.shape, x=x)
    x = _clean(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def aggregate_loss(losses: Tensor, mask: Tensor, loss_agg: str = "token-mean") -> Tensor:
    """Per-token losses [B, T] -> scalar.
    "token-mean": sum over every real token / number of real tokens.
    "seq-mean-token-mean": each sequence's token mean, averaged over sequences that have at
    least one real token.
    "seq-mean-token-sum-norm": each sequence's token sum divided by the constant T (the
    generation budget, max_new_tokens), averaged over all B rows: sum / (B * T) (Dr. GRPO; TRL's
    "dr_grpo"). The divisor depends on neither lengths nor how many rows are empty.
    Under gradient accumulation each micro-batch's loss is weighted by
    `aggregation_count(micro) / aggregation_count(minibatch)`."""
    check_choice("aggregate_loss", "loss_agg", loss_agg, LOSS_AGGS)
    mask = _bool_mask("aggregate_loss", mask)
    check_same_shape("aggregate_loss", "mask", mask.shape, losses=losses)
    if loss_agg == "token-mean":
        return masked_mean(losses, mask)
    if loss_agg == "seq-mean-token-sum-norm":
        return masked_sum(losses, mask, axis=-1).sum() / mask.numel()
    per_seq = masked_mean(losses, mask, axis=-1)
    has_tokens = mask.any(dim=-1)
    return masked_mean(per_seq, has_tokens)


def aggregation_count(mask: Tensor, loss_agg: str = "token-mean") -> Tensor:
    """What `aggregate_loss` divides by, counted on this mask, as float32 (exact below 2^24): real
    tokens (token-mean), sequences with a real token (seq-mean-token-mean), rows
    (seq-mean-token-sum-norm; the constant T is in the loss itself). For micro-batches m of one
    minibatch M, sum_m count(m) / count(M) * aggregate_loss(m) = aggregate_loss(M), so the
    accumulated gradient is the minibatch's. A micro-batch without any real token has count 0
    (token-mean, seq-mean-token-mean) and must be given weight 0, not its loss."""
    check_choice("aggregation_count", "loss_agg", loss_agg, LOSS_AGGS)
    mask = _bool_mask("aggregation_count", mask, allow_all_zero=True)
    if mask.ndim != 2:
        raise ValueError(f"aggregation_count: mask must be 2-D [batch, time], got shape {tuple(mask.shape)}")
    if loss_agg == "token-mean":
        n = mask.sum()
    elif loss_agg == "seq-mean-token-mean":
        n = mask.any(dim=-1).sum()
    else:
        n = torch.tensor(mask.shape[0], device=mask.device)
    return n.to(torch.float32)


def last_token_index(mask: Tensor) -> Tensor:
    """[B, T] -> [B]: the index of each row's last real (non-zero) position; 0 for a row without
    one (such a row's result is masked out wherever it is used: an empty response's terminal
    reward, a padded row's score). Used by the reward placement (advantages.py) and the scalar
    heads (models/heads.py)."""
    mask = torch.as_tensor(mask) != 0
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values.clamp(min=0)


__all__ = ["last_token_index", "masked_sum", "masked_mean", "masked_var", "whiten", "aggregate_loss",
           "aggregation_count"]
