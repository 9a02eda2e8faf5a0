"""One whole PPO-RLHF iteration, written apart from the library: plain PyTorch + `transformers`,
one loop per concept (CleanRL-style), no KV cache, no vectorised tricks, and NOTHING imported
from `ppo_rlhf`, `ppo_torch` or `ppo_jax`. `parity_tests/test_ppo_reference.py` feeds it and both
trainers the same weights, prompts, sampling noise and minibatch order and compares rollouts,
statistics and updated weights: a bug in shared code, or the same bug in both backends, cannot
pass that test by construction.

What it implements (the library's documented defaults and the options the test uses):
  1. sampling: token_t = argmax(logits / T + noise[:, t]) (Gumbel-max), full forward each step,
     positions = cumsum(mask) - 1; a row stops after EOS (later tokens pad, mask 0);
  2. log pi(a_t | s_t) and log pi_ref(a_t | s_t) from log_softmax(logits / T) at position P-1+t;
     critic values V(s_t) at the same positions; score = reward function of the decoded text, or
     gain * head(last real token) + bias of a reward-model checkpoint; minus the missing-EOS
     penalty for rows without EOS;
  3. rewards r_t = -beta * (log pi - log pi_ref), + score on the last real token;
  4. GAE: delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last real token),
     A_t = delta_t + gamma lam A_{t+1}; returns = A + V; A whitened (mean 0, biased variance);
  5. for each minibatch (rows given), for each micro-batch: clipped policy loss (eq. 4.3), clipped
     value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps_v) - R)^2), aggregated over the
     MINIBATCH (token-mean, or mean over sequences of each sequence's token mean) so that the
     micro-batch losses sum to the minibatch loss; then one global-norm clip over policy and
     critic (g * min(1, max_norm / (norm + 1e-6))) and one AdamW step written out by hand.
LoRA (`lora`: the adapters of the policy and / or the critic): each adapted projection computes
y = x W + b + (x A B) * alpha / r by hand (`LoRAProjection`, A [in, r], B [r, out]); only A and B
(and the critic's score head) are trained -- the base weights get no gradient and no AdamW step
-- and the reference log-probs are the policy's with its adapters switched off (no second model).
GRPO (advantage_estimator="grpo"; the rows are num_generations adjacent samples per prompt): no
critic; each sequence's return (score - beta * its summed KL) minus its group's mean, over the
group's unbiased standard deviation + 1e-6, on every real token; the loss adds kl_loss_coef times
the aggregated k2 = 0.5 (log pi - log pi_ref)^2 (kl_loss_estimator "k2" only) and has no value
term.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits


def _head(model, ids, mask):
    """The scalar head of a *ForSequenceClassification model at every position, [B, T]."""
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    return model.score(out.last_hidden_state)[..., 0]


class LoRAProjection(torch.nn.Module):
    """A projection with a LoRA adapter, from the formula: y = x W + b + (x A B) * alpha / r
    (Hu et al. 2021), with W [in, out] as GPT-2's Conv1D stores it ([out, in] for nn.Linear) and
    A [in, r], B [r, out]; `on` False computes x W + b alone. Its tensors are named as peft names
    them: `weight`, `bias` (the base's own parameters, frozen), `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] (nn.Linear layout: A.T, B.T)."""

    def __init__(self, base, a: np.ndarray, b: np.ndarray, alpha: float, dtype):
        super().__init__()
        self.transposed = isinstance(base, torch.nn.Linear)  # nn.Linear: weight [out, in]
        self.weight = base.weight.requires_grad_(False)
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)
        self.lora_A, self.lora_B = torch.nn.Module(), torch.nn.Module()
        self.lora_A.weight = torch.nn.Parameter(torch.as_tensor(np.asarray(a), dtype=dtype).clone())
        self.lora_B.weight = torch.nn.Parameter(torch.as_tensor(np.asarray(b), dtype=dtype).clone())
        self.scale = alpha / a.shape[0]  # alpha / r
        self.on = True

    def forward(self, x):
        w = self.weight.T if self.transposed else self.weight
        y = x @ w
        if self.bias is not None:
            y = y + self.bias
        if not self.on:
            return y
        A, B = self.lora_A.weight.T, self.lora_B.weight.T  # [in, r], [r, out]
        return y + ((x @ A) @ B) * self.scale


def add_lora(model, adapters: dict, alpha: float, dtype) -> list[LoRAProjection]:
    """Replace each module named in `adapters` ({module name: (A [r, in], B [out, r])}, PEFT
    names and layout) with a `LoRAProjection` of it; freeze every other parameter of `model`."""
    model.requires_grad_(False)
    out = []
    for name, (a, b) in adapters.items():
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        layer = LoRAProjection(getattr(holder, child), a, b, alpha, dtype)
        setattr(holder, child, layer)
        out.append(layer)
    return out


class Critic(torch.nn.Module):
    """V = head + bias, a *ForSequenceClassification backbone with its score head."""

    def __init__(self, model, bias: float):
        super().__init__()
        self.model, self.bias = model, bias

    def forward(self, ids, mask):
        return _head(self.model, ids, mask) + self.bias


def load_models(policy_dir: str | Path, *, reference_dir: str | Path | None,
                reward_dir: str | Path | None, critic_head: np.ndarray | None, dtype: torch.dtype):
    """(policy, reference, critic, reward model or None, (gain, bias)). The reference is a frozen
    copy of the policy unless `reference_dir` is given; the critic is the reward model with its
    normalisation gain folded into the head and its bias kept (its values start as the reward's
    scores), or -- with a reward function -- the policy's backbone with `critic_head`."""
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=dtype).eval()
    reference = (copy.deepcopy(policy) if reference_dir is None else
                 AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=dtype).eval())
    reference.requires_grad_(False)
    reward_model, norm = None, (1.0, 0.0)
    if reward_dir is not None:
        reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), dtype=dtype)
        reward_model = reward_model.eval().requires_grad_(False)
        extra = json.loads((Path(reward_dir) / "config.json").read_text()).get("ppo_rlhf", {})
        norm = (float(extra.get("reward_gain", 1.0)), float(extra.get("reward_bias", 0.0)))
        critic_model = copy.deepcopy(reward_model).requires_grad_(True)
        with torch.no_grad():
            critic_model.score.weight.mul_(norm[0])
        critic = Critic(critic_model, norm[1])
    else:
        critic_model = AutoModelForSequenceClassification.from_pretrained(
            str(policy_dir), num_labels=1, dtype=dtype).eval()
        with torch.no_grad():
            critic_model.score.weight.copy_(torch.as_tensor(critic_head, dtype=dtype))
        critic = Critic(critic_model, 0.0)
    return policy, reference, critic.eval(), reward_model, norm


@torch.no_grad()
def sample(policy, q, qm, noise, *, max_new_tokens, temperature, eos_id, pad_id):
    B = q.shape[0]
    resp = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    rmask = torch.zeros((B, max_new_tokens), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new_tokens):
        ids, mask = torch.cat([q, resp[:, :t]], 1), torch.cat([qm, rmask[:, :t]], 1)
        logits = _logits(policy, ids, mask)[:, -1]
        token = torch.argmax(logits / temperature + noise[:, t].to(logits.dtype), dim=-1)
        for b in range(B):
            if not done[b]:
                resp[b, t], rmask[b, t] = token[b], 1
                done[b] = bool(token[b] == eos_id)
        if bool(done.all()):
            break
    return resp, rmask


def token_logprobs(model, q, qm, r, rm, temperature, *, with_entropy=False):
    P, R = q.shape[1], r.shape[1]
    logits = _logits(model, torch.cat([q, r], 1), torch.cat([qm, rm], 1))[:, P - 1:P - 1 + R]
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    lp = torch.gather(logp_all, -1, r[..., None])[..., 0] * rm
    if not with_entropy:
        return lp
    return lp, -(logp_all.exp() * logp_all).sum(-1) * rm


def token_values(critic, q, qm, r, rm):
    P, R = q.shape[1], r.shape[1]
    return critic(torch.cat([q, r], 1), torch.cat([qm, rm], 1))[:, P - 1:P - 1 + R] * rm


def gae(rewards, values, rm, gamma, lam):
    B = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    for b in range(B):
        last = int(rm[b].sum()) - 1
        running = 0.0
        for t in range(last, -1, -1):
            next_value = values[b, t + 1] if t < last else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv, (adv + values) * rm


def aggregate(x, rm, mode):
    """Mean over real tokens; the mean over non-empty sequences of each one's token mean; or each
    sequence's token sum over the constant T, averaged over all rows (Dr. GRPO)."""
    real = rm.bool()
    if mode == "seq-mean-token-mean":
        per_seq = (x * rm).sum(1) / rm.sum(1).clamp(min=1)
        return per_seq[real.any(1)].mean()
    if mode == "seq-mean-token-sum-norm":
        return (x * rm).sum() / (rm.shape[0] * rm.shape[1])
    return x[real].mean()


def count(rm, mode):
    """What a micro-batch's weight counts: real tokens, non-empty sequences, or rows."""
    if mode == "seq-mean-token-mean":
        return (rm.sum(1) > 0).sum()
    if mode == "seq-mean-token-sum-norm":
        return torch.tensor(rm.shape[0])
    return rm.sum()


def grpo_advantages(rewards, rm, G, eps=1e-6):
    """Each row's return (its rewards summed) minus its group's mean over the group's unbiased
    std + eps, on every real token; the return itself as `returns`."""
    B = len(rewards)
    ret = torch.stack([rewards[b][rm[b].bool()].sum() for b in range(B)])
    adv = torch.zeros(B, dtype=rewards.dtype)
    for start in range(0, B, G):
        group = ret[start:start + G]
        mean = group.sum() / G
        std = math.sqrt(float(((group - mean) ** 2).sum()) / (G - 1))
        for b in range(start, start + G):
            adv[b] = (ret[b] - mean) / (std + eps)
    real = rm.bool()
    return (torch.where(real, adv[:, None], torch.zeros_like(rewards)),
            torch.where(real, ret[:, None], torch.zeros_like(rewards)))


def whiten(x, rm, eps=1e-8):
    real = rm.bool()
    mean = x[real].mean()
    var = ((x[real] - mean) ** 2).mean()
    return torch.where(real, (x - mean) / torch.sqrt(var + eps), torch.zeros_like(x))


class AdamW:
    """torch.optim.AdamW's update, written out: decoupled decay first, then the Adam step."""

    def __init__(self, params, lr, eps, weight_decay, betas=(0.9, 0.999)):
        self.params, self.lr, self.eps, self.wd, self.betas = list(params), lr, eps, weight_decay, betas
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            p.mul_(1 - self.lr * self.wd)
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def ppo_iteration(policy_dir, *, query_ids, query_mask, noise, minibatch_rows, cfg: dict,
                  eos_id: int, pad_id: int, tokenizer, reward_fn: Callable | None = None,
                  reward_dir=None, reference_dir=None, critic_head=None, lora: dict | None = None,
                  dtype=torch.float32) -> dict[str, Any]:
    """One iteration from the checkpoints; `cfg` holds the PPOConfig fields used (see the module
    docstring). `lora`: {"alpha": alpha, "policy": adapters, "critic": adapters} (either role may
    be absent), adapters as `add_lora` takes them; with adapters on the policy the reference is
    the policy with its adapters off (`reference_dir` must be None). Returns {"rollout": {...},
    "stats": {...}, "policy": {name: array}, "critic": {name: array}} with HF tensor names (a LoRA
    model's adapters under peft's: <module>.lora_A.weight)."""
    policy, reference, critic, reward_model, (gain, bias) = load_models(
        policy_dir, reference_dir=reference_dir, reward_dir=reward_dir, critic_head=critic_head,
        dtype=dtype)
    policy_lora = []
    if lora is not None:
        if "policy" in lora:
            assert reference_dir is None, "a LoRA policy's reference is its base: no reference dir"
            policy_lora = add_lora(policy, lora["policy"], lora["alpha"], dtype)
            reference = None  # the policy with its adapters off
        if "critic" in lora:
            add_lora(critic.model, lora["critic"], lora["alpha"], dtype)
            critic.model.score.weight.requires_grad_(True)  # the head trains with the adapters
    q, qm = torch.as_tensor(query_ids).long(), torch.as_tensor(query_mask).long()
    noise = torch.as_tensor(noise)
    T = cfg["temperature"]
    grpo = cfg.get("advantage_estimator", "gae") == "grpo"
    if grpo:
        assert cfg["kl_loss_estimator"] == "k2", "the reference writes out k2 only"

    # ---- rollout -------------------------------------------------------------------------------
    r, rm = sample(policy, q, qm, noise, max_new_tokens=cfg["max_new_tokens"], temperature=T,
                   eos_id=eos_id, pad_id=pad_id)
    with torch.no_grad():
        logprobs = token_logprobs(policy, q, qm, r, rm, T)
        if reference is None:  # the LoRA policy's base: its adapters off
            for layer in policy_lora:
                layer.on = False
            ref_logprobs = token_logprobs(policy, q, qm, r, rm, T)
            for layer in policy_lora:
                layer.on = True
        else:
            ref_logprobs = token_logprobs(reference, q, qm, r, rm, T)
        values = torch.zeros(r.shape, dtype=dtype) if grpo else token_values(critic, q, qm, r, rm)
        last = rm.sum(1) - 1
        has_eos = torch.tensor([bool((r[b, : last[b] + 1] == eos_id).any()) for b in range(len(r))])
        if reward_model is not None:
            full, fmask = torch.cat([q, r], 1), torch.cat([qm, rm], 1)
            end = fmask.shape[1] - 1 - torch.argmax(fmask.flip(-1), dim=-1)  # last real token
            scores = gain * _head(reward_model, full, fmask)[torch.arange(len(r)), end] + bias
        else:
            text = lambda ids, m: [tokenizer.decode([int(t) for t, k in zip(a, b) if k],
                                                    skip_special_tokens=True) for a, b in zip(ids, m)]
            # a reward function's scores are float32 (the library's RolloutBatch contract)
            scores = torch.tensor(reward_fn(text(q, qm), text(r, rm)), dtype=torch.float32)
        if cfg.get("missing_eos_penalty") is not None:
            scores = torch.where(has_eos, scores, scores - cfg["missing_eos_penalty"])
        scores = scores.to(dtype)

        # ---- rewards, GAE, whitening ---------------------------------------------------------------
        kl = (logprobs - ref_logprobs) * rm
        rewards = -cfg["kl_coef"] * kl
        for b in range(len(r)):
            rewards[b, last[b]] += scores[b]
        if grpo:
            advantages, returns = grpo_advantages(rewards, rm, cfg["num_generations"])
        else:
            advantages, returns = gae(rewards, values, rm, cfg["gamma"], cfg["lam"])
            advantages = whiten(advantages, rm)

    # ---- K epochs x M minibatches x A micro-batches -----------------------------------------------
    trained = list(policy.parameters()) + ([] if grpo else list(critic.parameters()))
    params = [p for p in trained if p.requires_grad]
    opt = AdamW(params, cfg["learning_rate"], cfg["adam_eps"], cfg["weight_decay"])
    per_step = []
    for rows in np.asarray(minibatch_rows):
        for p in params:
            p.grad = torch.zeros_like(p)
        rows = torch.as_tensor(rows).long()
        mode = cfg["loss_agg"]
        total = count(rm[rows], mode)
        step_stats: dict[str, float] = {}
        for micro in rows.reshape(cfg["grad_accum_steps"], -1):
            mq, mqm, mr, mrm = q[micro], qm[micro], r[micro], rm[micro]
            new_lp, ent = token_logprobs(policy, mq, mqm, mr, mrm, T, with_entropy=True)
            new_v = values[micro] if grpo else token_values(critic, mq, mqm, mr, mrm)
            adv, ret, old_lp, old_v = advantages[micro], returns[micro], logprobs[micro], values[micro]
            ratio = torch.exp(new_lp - old_lp)
            eps = cfg["clip_eps"]
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
            v_clip = old_v + (new_v - old_v).clamp(-cfg["value_clip_eps"], cfg["value_clip_eps"])
            vf = 0.5 * torch.maximum((new_v - ret) ** 2, (v_clip - ret) ** 2)
            real = mrm.bool()
            n_micro = count(mrm, mode)
            weight = n_micro / total  # this micro-batch's share of the minibatch loss

            pg_loss, vf_loss = aggregate(pg, mrm, mode), aggregate(vf, mrm, mode)
            named = []
            if grpo:  # no value loss; k2 KL in the loss
                kl_term = aggregate(0.5 * (new_lp - ref_logprobs[micro]) ** 2, mrm, mode)
                loss = pg_loss + cfg["kl_loss_coef"] * kl_term
                named.append(("loss/kl", kl_term))
            else:
                loss = pg_loss + cfg["vf_coef"] * vf_loss
                named += [("loss/value", vf_loss), ("val/clipfrac", (((v_clip - ret) ** 2 > (new_v - ret) ** 2)
                                                                     .to(dtype))[real].mean())]
            (loss * weight).backward()
            w = float(weight)
            for name, value in (("loss/policy", pg_loss), *named,
                                ("policy/entropy", aggregate(ent, mrm, mode)),
                                ("policy/clipfrac", ((-adv * ratio.clamp(1 - eps, 1 + eps) > -adv * ratio)
                                                     .to(dtype))[real].mean()),
                                ("policy/approxkl", (ratio - 1 - torch.log(ratio))[real].mean()),
                                ("val/ratio", ratio[real].mean())):
                step_stats[name] = step_stats.get(name, 0.0) + w * float(value.detach())
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        scale = min(1.0, cfg["max_grad_norm"] / (norm + 1e-6))
        for p in params:
            p.grad.mul_(scale)
        opt.step()
        step_stats["policy/grad_norm"] = norm
        per_step.append(step_stats)

    stats = {f"{k}_avg" if k != "val/ratio" else k: float(np.mean([s[k] for s in per_step]))
             for k in per_step[0]}
    stats.update({
        "objective/kl": float(kl.sum(1).mean()),
        "objective/scores": float(scores.mean()),
        "objective/entropy": float((-logprobs).sum(1).mean()),
        "val/returns_mean": float(returns[rm.bool()].mean()),
        "gen/eos_frac": float(has_eos.double().mean()),
        "gen/response_len_mean": float(rm.sum(1).double().mean()),
    })
    to_np = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    return {"rollout": {"response_ids": r.numpy(), "response_mask": rm.numpy(),
                        "logprobs": logprobs.numpy(), "ref_logprobs": ref_logprobs.numpy(),
                        "values": values.numpy(), "scores": scores.numpy()},
            "stats": stats, "policy": to_np(policy), "critic": to_np(critic.model)}
