"""PPO losses, KL estimators and log-probs in PyTorch. Mirror: `ppo_jax/losses.py`.

Every function is masked: `mask` is 1 on real tokens and 0 on padding; values at padded positions
never reach a result or a gradient, even if they are NaN or inf (each input is replaced by 0 there
*before* any arithmetic, so no NaN*0 can leak into a gradient). A NaN at a real position
propagates into the result -- the trainer detects it (a non-finite loss skips the update). Math
runs in float32 at least (bfloat16 inputs are upcast; float64 stays float64).

Shapes are checked on every call. Mask values (0/1 only, not all zero) are checked when reading
them is free -- a CPU tensor outside `torch.compile`; on an accelerator they are trusted (reading
them would force a host sync) and an all-zero mask gives 0 instead of an error.

Seed formulas (../shared/seed, GUIDE §1), with r_t = pi(a_t|s_t) / pi_old(a_t|s_t):
  (4.1) policy gradient     loss_t = -log pi(a_t|s_t) * A_t
  (4.2) importance sampling loss_t = -r_t * A_t
  (4.3) clipped objective   loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)
"""

from __future__ import annotations

from typing import Any

import torch

from ppo_rlhf.checks import check_choice, check_mask_values, check_same_shape
from ppo_rlhf.config import KL_ESTIMATORS, LOSS_AGGS, POLICY_LOSS_KINDS

Tensor = torch.Tensor
Stats = dict[str, Tensor]


# ---- helpers shared by losses and advantages ----------------------------------------------------
def _float(x: Any) -> Tensor:
    """At least float32: bf16/f16 are upcast, f64 stays f64 (for the float64 parity tests)."""
    x = torch.as_tensor(x)
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _bool_mask(fn: str, mask: Any, *, allow_all_zero: bool = False) -> Tensor:
    """The mask as bool; its values are checked when that costs no host sync."""
    mask = torch.as_tensor(mask)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        check_mask_values(fn, mask.detach().numpy(), allow_all_zero=allow_all_zero)
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
    least one real token."""
    check_choice("aggregate_loss", "loss_agg", loss_agg, LOSS_AGGS)
    mask = _bool_mask("aggregate_loss", mask)
    check_same_shape("aggregate_loss", "mask", mask.shape, losses=losses)
    if loss_agg == "token-mean":
        return masked_mean(losses, mask)
    per_seq = masked_mean(losses, mask, axis=-1)
    has_tokens = mask.any(dim=-1)
    return masked_mean(per_seq, has_tokens)


# ---- log-probs and entropy ----------------------------------------------------------------------
def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[labels], in float32: logits [..., V], labels [...].
    Computed as logit[label] - logsumexp(logits) so no [..., V] log-prob tensor is materialised."""
    logits = _float(logits) / temperature
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, in float32: [..., V] -> [...]."""
    logits = _float(logits) / temperature
    # -sum p log p with log p computed first: every term has the same sign, so nothing cancels
    # (logsumexp - sum(p * logits) loses ~1e-6 relative to cancellation for peaked logits).
    logp = torch.log_softmax(logits, dim=-1)
    return -(torch.exp(logp) * logp).sum(dim=-1)


def entropy(logits: Tensor, mask: Tensor, *, temperature: float = 1.0,
            loss_agg: str = "token-mean") -> Tensor:
    """Mean entropy of the policy over real tokens (aggregated like the losses)."""
    mask = _bool_mask("entropy", mask)
    check_same_shape("entropy", "mask", mask.shape, logits=logits[..., 0])
    return aggregate_loss(token_entropy(logits, temperature), mask, loss_agg)


# ---- KL -----------------------------------------------------------------------------------------
def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1",
               mask: Tensor | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with d = log pi - log pi_ref:
    k1 = d (unbiased, can be < 0 per token); k2 = d^2 / 2; k3 = exp(-d) - 1 + d (unbiased, >= 0).
    With a mask, padded positions are 0."""
    check_choice("kl_penalty", "kind", kind, KL_ESTIMATORS)
    check_same_shape("kl_penalty", "logprobs", logprobs.shape, ref_logprobs=ref_logprobs, mask=mask)
    if mask is not None:
        mask = _bool_mask("kl_penalty", mask, allow_all_zero=True)
        logprobs, ref_logprobs = _clean(logprobs, mask), _clean(ref_logprobs, mask)
    d = _float(logprobs) - _float(ref_logprobs)
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d**2
    else:
        kl = torch.expm1(-d) + d
    return kl if mask is None else torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


# ---- policy loss (seed eqs. 4.1, 4.2, 4.3) ------------------------------------------------------
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                kind: str = "clip", clip_eps: float = 0.2, clip_eps_high: float | None = None,
                dual_clip: float | None = None, loss_agg: str = "token-mean") -> tuple[Tensor, Stats]:
    """PPO policy loss (to minimise) and its statistics. All inputs [B, T]; gradients flow only
    into `logprobs` (old log-probs and advantages are constants).

    kind="pg":   eq. 4.1, loss_t = -log pi * A.
    kind="is":   eq. 4.2, loss_t = -r * A,  r = exp(log pi - log pi_old).
    kind="clip": eq. 4.3, loss_t = -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A);
                 clip_eps_high=None means clip_eps (symmetric band). With dual_clip=c > 1, tokens
                 with A < 0 get loss_t = min(loss_t, -c A) (Ye et al. 2020).

    stats: ratio_mean/max/min over real tokens; clipfrac = fraction of real tokens where the
    clipped term is the active one (its gradient is 0) -- reported for every kind, as if clipping
    with these epsilons; dual_clipfrac; approx_kl_k1 = mean(log pi_old - log pi) and
    approx_kl_k3 = mean((r - 1) - log r), two estimates of KL(pi_old || pi)."""
    fn = "policy_loss"
    check_choice(fn, "kind", kind, POLICY_LOSS_KINDS)
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_same_shape(fn, "logprobs", logprobs.shape, old_logprobs=old_logprobs,
                     advantages=advantages, mask=mask)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: dual_clip={dual_clip!r} is invalid: allowed > 1")
    mask = _bool_mask(fn, mask)
    logprobs = _clean(logprobs, mask)
    old_logprobs = _clean(old_logprobs, mask).detach()
    advantages = _clean(advantages, mask).detach()

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi)
    clip_active = clipped > unclipped

    if kind == "pg":
        losses = -advantages * logprobs
    elif kind == "is":
        losses = unclipped
    else:
        losses = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(mask)
    if dual_clip is not None and kind == "clip":
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (bound < losses)
        losses = torch.where(dual_active, bound, losses)
    loss = aggregate_loss(losses, mask, loss_agg)

    with torch.no_grad():
        inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)
        stats = {
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, -inf).max(),
            "ratio_min": torch.where(mask, ratio, inf).min(),
            "clipfrac": masked_mean(clip_active.to(ratio.dtype), mask),
            "dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), mask),
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


# ---- value loss ---------------------------------------------------------------------------------
def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip_eps: float | None = 0.2, loss_agg: str = "token-mean") -> tuple[Tensor, Stats]:
    """Value loss (to minimise); gradients flow only into `values`.
    clip_eps=eps_v: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2);
    clip_eps=None:  0.5 * (V - R)^2.
    stats: vf_clipfrac (fraction of real tokens where the clipped term is the larger one) and
    explained_variance = 1 - Var(R - V) / Var(R) over real tokens (NaN when Var(R) = 0)."""
    fn = "value_loss"
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_same_shape(fn, "values", values.shape, old_values=old_values, returns=returns, mask=mask)
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"{fn}: clip_eps={clip_eps!r} is invalid: allowed > 0 or None")
    mask = _bool_mask(fn, mask)
    values = _clean(values, mask)
    old_values = _clean(old_values, mask).detach()
    returns = _clean(returns, mask).detach()

    unclipped = (values - returns) ** 2
    if clip_eps is None:
        losses, clip_active = unclipped, torch.zeros_like(mask)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clipped - returns) ** 2
        losses, clip_active = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(losses, mask, loss_agg)

    with torch.no_grad():
        v = values.detach()
        var_r = masked_var(returns, mask)
        nan = torch.tensor(float("nan"), dtype=v.dtype, device=v.device)
        stats = {
            "vf_clipfrac": masked_mean(clip_active.to(v.dtype), mask),
            "explained_variance": torch.where(var_r > 0, 1.0 - masked_var(returns - v, mask) / var_r, nan),
            "values_mean": masked_mean(v, mask),
        }
    return loss, stats
