"""A plain-numpy reference of the PPO math: the seed's formulas, GAE and whitening.

Written to be read, not to be fast: explicit loops over sequences and tokens, one formula per
line, float64 throughout. Both backends are checked against these functions.

The formulas of docs/formulas.md, with r_t = pi(a_t|s_t) / pi_old(a_t|s_t):
  (4.1) policy gradient      grad J = E[ sum_t grad log pi(a_t|s_t) * A_t ]
  (4.2) importance sampling  grad J ~ 1/N sum_i r_i * grad log pi(a_i|s_i) * A_i
  (4.3) clipped objective    L_CLIP = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]
Losses are the negated objectives (we minimise).
"""

from __future__ import annotations

import math

import numpy as np


def real_tokens(mask):
    """(b, t) index pairs of the real tokens, in order."""
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def aggregate(per_token, mask, loss_agg="token-mean"):
    """Per-token values -> scalar: mean over all real tokens; or mean over sequences of each
    sequence's mean (sequences without real tokens are left out); or mean over all rows of each
    row's sum divided by the row length T (seq-mean-token-sum-norm)."""
    if loss_agg == "token-mean":
        cells = real_tokens(mask)
        return sum(per_token[b, t] for b, t in cells) / len(cells)
    if loss_agg == "seq-mean-token-sum-norm":
        n_rows, budget = mask.shape
        row_sums = [sum(per_token[b, t] for t in range(budget) if mask[b, t]) for b in range(n_rows)]
        return sum(s / budget for s in row_sums) / n_rows
    seq_means = []
    for b in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        if ts:
            seq_means.append(sum(per_token[b, t] for t in ts) / len(ts))
    return sum(seq_means) / len(seq_means)


def masked_mean(x, mask):
    cells = real_tokens(mask)
    return sum(x[b, t] for b, t in cells) / len(cells)


def masked_var(x, mask, unbiased=False):
    cells = real_tokens(mask)
    mean = masked_mean(x, mask)
    sq = sum((x[b, t] - mean) ** 2 for b, t in cells)
    return sq / (len(cells) - 1 if unbiased else len(cells))


def whiten(x, mask, shift_mean=True, unbiased=False, eps=1e-8):
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    out = np.zeros_like(x, dtype=np.float64)
    for b, t in real_tokens(mask):
        out[b, t] = (x[b, t] - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def policy_loss_per_token(logprob, old_logprob, adv, kind="clip", clip_eps=0.2,
                          clip_eps_high=None, dual_clip=None):
    """The loss of one token, and d(loss)/d(logprob) written out by hand."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    r = math.exp(logprob - old_logprob)
    if kind == "pg":  # eq. 4.1
        return -logprob * adv, -adv
    if kind == "is":  # eq. 4.2: d(-r A)/d logprob = -r A  (since dr/dlogprob = r)
        return -r * adv, -r * adv
    # eq. 4.3: -min(r A, clip(r) A); the min picks the unclipped term unless the clipped one is
    # smaller, in which case the gradient is 0 (clip is constant outside its band).
    unclipped, clipped = r * adv, clip(r, 1 - clip_eps, 1 + hi) * adv
    if clipped < unclipped:
        loss, grad = -clipped, 0.0
    else:
        loss, grad = -unclipped, -r * adv
    if dual_clip is not None and adv < 0 and -dual_clip * adv < loss:
        loss, grad = -dual_clip * adv, 0.0  # dual clip: the objective is bounded below by c*A
    return loss, grad


def sequence_log_ratios(logprobs, old_logprobs, mask):
    """GSPO's log s_b: the mean over row b's real tokens of log pi - log pi_old (0 for an empty row)."""
    out = np.zeros(mask.shape[0])
    for b in range(mask.shape[0]):
        ts = [t for t in range(mask.shape[1]) if mask[b, t]]
        if ts:
            out[b] = sum(logprobs[b, t] - old_logprobs[b, t] for t in ts) / len(ts)
    return out


def policy_loss(logprobs, old_logprobs, advantages, mask, kind="clip", clip_eps=0.2,
                clip_eps_high=None, dual_clip=None, loss_agg="token-mean", importance_level="token"):
    """Returns (loss, d loss / d logprobs, stats) -- the reference of both backends' policy_loss.
    importance_level="sequence": every token of row b uses the ratio s_b = exp(log s_b)."""
    per_token = np.zeros(logprobs.shape)
    grad_per_token = np.zeros(logprobs.shape)
    seq_log_ratio = sequence_log_ratios(logprobs, old_logprobs, mask)
    for b, t in real_tokens(mask):
        if importance_level == "sequence":  # the token's loss as a function of log s_b
            lp, old = seq_log_ratio[b], 0.0
        else:
            lp, old = logprobs[b, t], old_logprobs[b, t]
        per_token[b, t], grad_per_token[b, t] = policy_loss_per_token(
            lp, old, advantages[b, t], kind, clip_eps, clip_eps_high, dual_clip)
    loss = aggregate(per_token, mask, loss_agg)
    # The aggregate is a weighted sum of per-token losses; d loss / d logprob_bt = weight_bt * g_bt.
    weights = aggregation_weights(mask, loss_agg)
    grad = weights * grad_per_token
    if importance_level == "sequence":
        # g_bt' is d loss_bt' / d log s_b, and d log s_b / d logprob_bt = 1 / n_b for each real t:
        # every token of the row gets (1 / n_b) * sum_t' weight_bt' * g_bt'.
        seq_grad = np.zeros(logprobs.shape)
        for b in range(mask.shape[0]):
            ts = [t for t in range(mask.shape[1]) if mask[b, t]]
            for t in ts:
                seq_grad[b, t] = sum(grad[b, u] for u in ts) / len(ts)
        grad = seq_grad

    hi = clip_eps if clip_eps_high is None else clip_eps_high
    cells = real_tokens(mask)
    if importance_level == "sequence":
        ratios = {c: math.exp(seq_log_ratio[c[0]]) for c in cells}
    else:
        ratios = {c: math.exp(logprobs[c] - old_logprobs[c]) for c in cells}
    clip_active = [(-advantages[c] * clip(ratios[c], 1 - clip_eps, 1 + hi)) > (-advantages[c] * ratios[c])
                   for c in cells]
    dual_active = []
    for c in cells:
        a, r = advantages[c], ratios[c]
        base = max(-a * r, -a * clip(r, 1 - clip_eps, 1 + hi))
        dual_active.append(kind == "clip" and dual_clip is not None and a < 0 and -dual_clip * a < base)
    n = len(cells)
    stats = {
        "ratio_mean": sum(ratios.values()) / n,
        "ratio_max": max(ratios.values()),
        "ratio_min": min(ratios.values()),
        "clipfrac": sum(clip_active) / n,
        "dual_clipfrac": sum(dual_active) / n,
        "approx_kl_k1": sum(old_logprobs[c] - logprobs[c] for c in cells) / n,
        # the KL estimates are per token at either importance level (they measure the policy change)
        "approx_kl_k3": sum(math.expm1(logprobs[c] - old_logprobs[c]) - (logprobs[c] - old_logprobs[c])
                            for c in cells) / n,
    }
    return loss, grad, stats


def aggregation_weights(mask, loss_agg="token-mean"):
    """d(aggregate)/d(per-token value): 1/N per real token (token-mean), 1/(S * n_b)
    (seq-mean-token-mean, S = sequences with tokens, n_b = tokens in sequence b), or 1/(B * T)
    (seq-mean-token-sum-norm, B rows of length T)."""
    w = np.zeros(mask.shape)
    if loss_agg == "token-mean":
        cells = real_tokens(mask)
        for c in cells:
            w[c] = 1.0 / len(cells)
        return w
    if loss_agg == "seq-mean-token-sum-norm":
        for c in real_tokens(mask):
            w[c] = 1.0 / (mask.shape[0] * mask.shape[1])
        return w
    counts = mask.sum(axis=1)
    n_seqs = int((counts > 0).sum())
    for b, t in real_tokens(mask):
        w[b, t] = 1.0 / (n_seqs * counts[b])
    return w


def aggregation_count(mask, loss_agg="token-mean"):
    """A micro-batch's weight numerator: real tokens, sequences with a real token, or rows."""
    if loss_agg == "token-mean":
        return len(real_tokens(mask))
    if loss_agg == "seq-mean-token-mean":
        return sum(1 for b in range(mask.shape[0]) if any(mask[b]))
    return mask.shape[0]


def value_loss(values, old_values, returns, mask, clip_eps=0.2, loss_agg="token-mean"):
    """Returns (loss, d loss / d values, stats)."""
    per_token = np.zeros(values.shape)
    grad_per_token = np.zeros(values.shape)
    clip_active = []
    for b, t in real_tokens(mask):
        v, v_old, ret = values[b, t], old_values[b, t], returns[b, t]
        unclipped = (v - ret) ** 2
        if clip_eps is None:
            per_token[b, t], grad_per_token[b, t] = unclipped, 2 * (v - ret)
            clip_active.append(False)
            continue
        v_clipped = v_old + clip(v - v_old, -clip_eps, clip_eps)
        clipped = (v_clipped - ret) ** 2
        if clipped > unclipped:  # the clipped branch wins; it is constant in v outside the band
            inside = -clip_eps < v - v_old < clip_eps
            per_token[b, t], grad_per_token[b, t] = clipped, (2 * (v_clipped - ret) if inside else 0.0)
        else:
            per_token[b, t], grad_per_token[b, t] = unclipped, 2 * (v - ret)
        clip_active.append(clipped > unclipped)
    loss = 0.5 * aggregate(per_token, mask, loss_agg)
    grad = 0.5 * aggregation_weights(mask, loss_agg) * grad_per_token
    var_r = masked_var(returns, mask)
    stats = {
        "vf_clipfrac": sum(clip_active) / len(clip_active),
        "explained_variance": 1 - masked_var(returns - values, mask) / var_r if var_r > 0 else float("nan"),
        "values_mean": masked_mean(values, mask),
    }
    return loss, grad, stats


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    out = np.zeros(logprobs.shape)
    for idx in np.ndindex(logprobs.shape):
        d = logprobs[idx] - ref_logprobs[idx]  # log (p / q)
        if kind == "k1":
            out[idx] = d
        elif kind == "k2":
            out[idx] = 0.5 * d * d
        else:  # k3 = q/p - 1 - log(q/p)
            out[idx] = math.exp(-d) - 1 + d
    return out


def kl_loss(logprobs, ref_logprobs, kind="k2"):
    """(per-token value, d value / d logprob) of each KL-in-the-loss estimator, d = log p - log q:
    k1 = d (grad 1), k2 = d^2 / 2 (grad d), k3 = exp(-d) - 1 + d (grad 1 - exp(-d)); "k1+" / "k3+"
    have k1's / k3's value and k2's gradient."""
    values = kl_penalty(logprobs, ref_logprobs, kind.rstrip("+"))
    d = logprobs - ref_logprobs
    if kind.endswith("+") or kind == "k2":
        grads = d
    elif kind == "k1":
        grads = np.ones_like(d)
    else:
        grads = 1 - np.exp(-d)
    return values, grads


def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator="k1"):
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    for b in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[b, t]]
        if real:
            rewards[b, real[-1]] += scores[b]  # the score lands on the last real token
    return rewards * mask, kl


def gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one sequence at a time, backwards over its real tokens; the step after the
    last real token is terminal."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(real):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            next_value = values[b, t]
    return adv, (adv + values) * mask


def gae_magnitude(rewards, values, mask, gamma, lam):
    """The size of what GAE's recurrence adds up to reach A_t: M_t = |r_t| + gamma |V_{t+1}| +
    |V_t| + gamma lam M_{t+1} (the recurrence on absolute values). Floating-point error of any
    evaluation of the recurrence is relative to M_t, not to A_t: where the partial sums cancel
    (|A_t| << M_t) the rounding of those sums remains (the condition number is M_t / |A_t|)."""
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        real = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, running = 0.0, 0.0
        for t in reversed(real):
            running = abs(rewards[b, t]) + gamma * abs(next_value) + abs(values[b, t]) + gamma * lam * running
            out[b, t] = running
            next_value = values[b, t]
    return out


def reward_to_go(rewards, mask):
    """sum_{k >= t} r_k over the real tokens of each row (GAE with gamma = lam = 1, plus V_t)."""
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                running += rewards[b, t]
                out[b, t] = running
    return out


def group_advantages(scores, num_generations, kind, eps=1e-6):
    """One prompt's G samples at a time: GRPO (mean removed, divided by the unbiased std + eps;
    0 for a lone sample), Dr. GRPO (mean removed), RLOO (minus the mean of the other samples)."""
    g = num_generations
    out = np.zeros(len(scores))
    for start in range(0, len(scores), g):
        group = [float(x) for x in scores[start:start + g]]
        mean = sum(group) / g
        for j, s in enumerate(group):
            if kind == "dr_grpo":
                out[start + j] = s - mean
            elif kind == "rloo":
                others = group[:j] + group[j + 1:]
                out[start + j] = s - sum(others) / len(others)
            else:  # grpo
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (g - 1)) if g > 1 else 0.0
                out[start + j] = (s - mean) / (std + eps)
    return out


def discounted_reward_to_go(rewards, mask, gamma):
    """G_t = r_t + gamma * G_{t+1} over each row's real tokens (the step after the last is terminal)."""
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in reversed([t for t in range(rewards.shape[1]) if mask[b, t]]):
            running = rewards[b, t] + gamma * running
            out[b, t] = running
    return out


def reinforce_pp_returns(rewards, mask, gamma):
    """REINFORCE++: (advantages = whitened reward-to-go over the batch's real tokens, returns)."""
    returns = discounted_reward_to_go(rewards, mask, gamma)
    return whiten(returns, mask), returns


def reinforce_pp_baseline(scores, logprobs, ref_logprobs, mask, kl_coef, num_generations, gamma,
                          kl_estimator="k1"):
    """REINFORCE++-baseline: scores minus their group mean, shaped with the KL, then as REINFORCE++."""
    centred = group_advantages(scores, num_generations, "dr_grpo")
    rewards, kl = shape_rewards(centred, logprobs, ref_logprobs, mask, kl_coef, kl_estimator)
    advantages, returns = reinforce_pp_returns(rewards, mask, gamma)
    return advantages, returns, kl


def token_entropy(logits, temperature=1.0):
    out = np.zeros(logits.shape[:-1])
    for idx in np.ndindex(out.shape):
        z = logits[idx] / temperature
        z = z - z.max()
        p = np.exp(z) / np.exp(z).sum()
        out[idx] = -sum(pi * math.log(pi) for pi in p if pi > 0)
    return out


def logprobs_from_logits(logits, labels, temperature=1.0):
    out = np.zeros(labels.shape)
    for idx in np.ndindex(labels.shape):
        z = logits[idx] / temperature
        m = z.max()
        out[idx] = z[labels[idx]] - (m + math.log(np.exp(z - m).sum()))
    return out


def adaptive_kl_update(kl_coef, current_kl, n_steps, target, horizon):
    error = clip(current_kl / target - 1, -0.2, 0.2)
    return kl_coef * (1 + error * n_steps / horizon)


def adamw(params, grads, lr, weight_decay, eps, b1=0.9, b2=0.999):
    """torch.optim.AdamW's arithmetic, step by step, in float64: the params after each of the
    `grads` (decoupled decay lr * wd * p; bias-corrected moments; eps outside the root)."""
    p = np.asarray(params, np.float64).copy()
    m, v, out = np.zeros_like(p), np.zeros_like(p), []
    for t, g in enumerate(grads, 1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * weight_decay * p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p.copy())
    return out
