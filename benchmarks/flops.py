"""Analytic FLOP and byte counts of one PPO iteration on a GPT-2-shaped model (no dependencies).

Matmul FLOPs only (2 per multiply-add); layer norms, softmax and element-wise work are ignored,
as MFU conventions do. Per token through a GPT-2 block: 2 * 12 d^2 (qkv, out, 2 MLP matmuls) +
attention 2 * 2 * ctx * d (scores and weighted sum over `ctx` keys). The LM head costs 2 V d per
token where logits are computed: every position at prefill-free forwards would be wasteful, and
both our backends compute them only for the R + 1 positions that score response tokens
(`logits_to_keep`); generation computes them for the last prompt position and each new token.
Backward = 2 x forward (the usual 6 N T rule: forward + backward = 3 x forward).
"""

from __future__ import annotations

from typing import Any


def _block_flops(spec: Any, tokens: int, ctx: float) -> float:
    d, L = spec.n_embd, spec.n_layer
    return tokens * L * (2 * 12 * d * d + 4 * ctx * d)


def forward_flops(spec: Any, batch: int, seq: int, logits_positions: int, *, head: str) -> float:
    """One forward pass of B sequences of length `seq` (full attention over `seq` keys)."""
    body = _block_flops(spec, batch * seq, seq)
    head_flops = (2 * spec.vocab_size * spec.n_embd * batch * logits_positions if head == "lm"
                  else 2 * spec.n_embd * batch * seq)
    return body + head_flops


def iteration_flops(spec: Any, wl: Any) -> dict[str, float]:
    B, P, R = wl.batch, wl.prompt_len, wl.response_len
    T = P + R
    gen = _block_flops(spec, B * P, P) + 2 * spec.vocab_size * spec.n_embd * B  # prefill
    for t in range(1, R):  # decode steps (the last sampled token is never fed back)
        gen += _block_flops(spec, B, P + t) + 2 * spec.vocab_size * spec.n_embd * B
    policy_fwd = forward_flops(spec, B, T, R + 1, head="lm")
    scalar_fwd = forward_flops(spec, B, T, 0, head="scalar")
    forward = 2 * policy_fwd + 2 * scalar_fwd  # policy, reference, critic, reward model
    update = wl.ppo_epochs * 3 * (policy_fwd + scalar_fwd)  # fwd + bwd of policy and critic
    return {"generation": gen, "forward": forward, "update": update,
            "total": gen + forward + update}


def decode_bytes_per_step(spec: Any, batch: int, ctx: int, bytes_per_param: int = 4) -> float:
    """Bytes a decode step must read: every weight once (tied embedding as the LM head) plus the
    KV cache of `ctx` positions."""
    d, L = spec.n_embd, spec.n_layer
    weights = (L * (12 * d * d + 13 * d) + spec.vocab_size * d + 2 * d) * bytes_per_param
    kv = 2 * L * batch * ctx * d * bytes_per_param
    return weights + kv
