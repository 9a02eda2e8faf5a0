"""PPO losses, KL estimators and log-probs in PyTorch. Mirror: `ppo_jax/losses.py`.

Every function is masked (the masked reductions are in `masked.py`): `mask` is 1 on real tokens
and 0 on padding; values at padded positions never reach a result or a gradient, even if they are
NaN or inf (each input is replaced by 0 there *before* any arithmetic, so no NaN*0 can leak into
a gradient). A NaN at a real position
propagates into the result -- the trainer detects it (a non-finite loss skips the update). Math
runs in float32 at least (bfloat16 inputs are upcast; float64 stays float64).

Shapes are checked on every call. Mask values (0/1 only, not all zero) are checked when reading
them is free -- a CPU tensor outside `torch.compile`; on an accelerator they are trusted (reading
them would force a host sync) and an all-zero mask gives 0 instead of an error.

The formulas of docs/formulas.md, with r_t = pi(a_t|s_t) / pi_old(a_t|s_t):
  (4.1) policy gradient     loss_t = -log pi(a_t|s_t) * A_t
  (4.2) importance sampling loss_t = -r_t * A_t
  (4.3) clipped objective   loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)
"""

from __future__ import annotations

import torch

from ppo_rlhf.checks import check_choice, check_same_shape
from ppo_rlhf.config import IMPORTANCE_LEVELS, KL_ESTIMATORS, KL_LOSS_KINDS, LOSS_AGGS, POLICY_LOSS_KINDS
from ppo_torch.masked import _bool_mask, _clean, _float, aggregate_loss, masked_mean, masked_var

Tensor = torch.Tensor
Stats = dict[str, Tensor]


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


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k2", mask: Tensor | None = None) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate to add to the loss (GRPO's KL term; aggregate it with
    `aggregate_loss`); gradients flow into `logprobs` only. With d = log pi - log pi_ref on tokens
    sampled from pi: k1, k2, k3 as `kl_penalty` (their values and their gradients); "k1+" / "k3+"
    take k1's / k3's value and k2's gradient, d * grad log pi (a straight-through form, verl's
    "+" suffix). In expectation over on-policy samples only k2's gradient (so "k1+" / "k3+" too)
    is grad KL(pi || pi_ref); k1's is 0 and k3's is grad KL(pi_ref || pi), the other direction
    (docs/formulas.md, "KL in the loss"). With a mask, padded positions are 0."""
    check_choice("kl_loss", "kind", kind, KL_LOSS_KINDS)
    ref_logprobs = torch.as_tensor(ref_logprobs).detach()
    if not kind.endswith("+"):
        return kl_penalty(logprobs, ref_logprobs, kind, mask=mask)
    value = kl_penalty(logprobs, ref_logprobs, kind[:-1], mask=mask)
    k2 = kl_penalty(logprobs, ref_logprobs, "k2", mask=mask)
    return value.detach() + (k2 - k2.detach())  # k2 - k2.detach() is exactly 0: the value is k1's / k3's


# ---- policy loss (seed eqs. 4.1, 4.2, 4.3) ------------------------------------------------------
def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                kind: str = "clip", clip_eps: float = 0.2, clip_eps_high: float | None = None,
                dual_clip: float | None = None, loss_agg: str = "token-mean",
                importance_level: str = "token") -> tuple[Tensor, Stats]:
    """PPO policy loss (to minimise) and its statistics. All inputs [B, T]; gradients flow only
    into `logprobs` (old log-probs and advantages are constants).

    kind="pg":   eq. 4.1, loss_t = -log pi * A.
    kind="is":   eq. 4.2, loss_t = -r * A,  r = exp(log pi - log pi_old).
    kind="clip": eq. 4.3, loss_t = -min(r A, clip(r, 1 - clip_eps, 1 + clip_eps_high) A);
                 clip_eps_high=None means clip_eps (symmetric band). With dual_clip=c > 1, tokens
                 with A < 0 get loss_t = min(loss_t, -c A) (Ye et al. 2020).

    importance_level="token": r = r_t, one ratio per token (PPO). importance_level="sequence":
    r = s_i = exp(mean over the real tokens of row i of (log pi - log pi_old)), the length-
    normalised sequence ratio of GSPO (Zheng et al. 2025), the same for every token of the row and
    clipped as one; its gradient reaches every token of the row through the mean. GSPO as
    published is this with loss_agg="seq-mean-token-mean" (per-row advantages then make each row's
    loss -min(s_i A_i, clip(s_i) A_i)). Only for kind "is" and "clip" (kind "pg" has no ratio).

    stats: ratio_mean/max/min over real tokens; clipfrac = fraction of real tokens where the
    clipped term is the active one (its gradient is 0) -- reported for every kind, as if clipping
    with these epsilons; dual_clipfrac; approx_kl_k1 = mean(log pi_old - log pi) and
    approx_kl_k3 = mean((r - 1) - log r), two estimates of KL(pi_old || pi). The ratio stats and
    clipfrac are of the ratio the loss uses (s_i at importance_level="sequence"); the KL estimates
    are per token at either level."""
    fn = "policy_loss"
    check_choice(fn, "kind", kind, POLICY_LOSS_KINDS)
    check_choice(fn, "loss_agg", loss_agg, LOSS_AGGS)
    check_choice(fn, "importance_level", importance_level, IMPORTANCE_LEVELS)
    check_same_shape(fn, "logprobs", logprobs.shape, old_logprobs=old_logprobs,
                     advantages=advantages, mask=mask)
    if importance_level == "sequence" and kind == "pg":
        raise ValueError(f"{fn}: importance_level='sequence' needs a ratio: allowed with kind 'is' or "
                         "'clip', not 'pg'")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: dual_clip={dual_clip!r} is invalid: allowed > 1")
    mask = _bool_mask(fn, mask)
    logprobs = _clean(logprobs, mask)
    old_logprobs = _clean(old_logprobs, mask).detach()
    advantages = _clean(advantages, mask).detach()

    log_ratio = logprobs - old_logprobs
    if importance_level == "sequence":  # one length-normalised ratio per row, on each of its tokens
        ratio = torch.exp(masked_mean(log_ratio, mask, axis=-1)[:, None].expand_as(log_ratio))
    else:
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
