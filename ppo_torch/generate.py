"""Sampling responses with a KV cache -- the reference. Mirror: `ppo_jax/generate.py`.

    out = generate(policy, query_ids, query_mask, max_new_tokens=64, temperature=0.7,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    out.response_ids   # [B, N] int64 (torch's index dtype): pad_token_id after the first EOS
    out.response_mask  # [B, N] int32: 1 up to AND including the first EOS, 0 after
    out.logprobs       # [B, N] float32: log softmax(logits / temperature)[token], 0 at padding

`model`: a `CausalLM` or `PolicyWithValueHead` (HF's KV cache through `use_cache=True` /
`cache=`, see `ppo_torch.models.causal_lm`). Prompts are LEFT-padded [B, P] (`RolloutBatch`
layout); every row needs at least one real token. Exactly `max_new_tokens` = N positions are
returned; `eos_token_id=None` never stops (fixed-length responses, as the benchmarks use).

Sampling rule (identical in both backends; see `ppo_rlhf.sampling`): scaled = logits / temperature,
top-k then top-p (nucleus) set dropped tokens to -inf, token = argmax(filtered + Gumbel noise);
greedy=True takes argmax(logits). Randomness, exactly one of:
  * greedy=True;
  * noise: float32 [B, N, V] standard Gumbel draws (`ppo_rlhf.sampling.gumbel_noise`), noise[:, t]
    for response position t -- fed to both backends, it makes them pick the same tokens;
  * generator: a `torch.Generator` on the model's device (it advances: draw after draw differs);
    None uses torch's global RNG (`torch.manual_seed`). Step t draws uniform u [B, V] and uses
    -log(-log(u)). Data parallel: with generator_rows=(first, total), step t draws u [total, V]
    and uses rows first ... first + B - 1, so N ranks seeded alike sample their rows of a batch
    exactly as one process samples the whole batch. (The JAX twin has no global RNG, so its
    `key` is required instead.)
`logprobs` are always of the UNFILTERED temperature distribution -- what PPO's ratio and the KL
use and what `response_logprobs(..., temperature)` recomputes. With top_k > 0 or top_p < 1 the
samples come from the filtered distribution, so PPO treats slightly off-policy samples as
on-policy; `PPOConfig` defaults (top_k=0, top_p=1) sample exactly from pi.
Logits and all sampling math are float32 (bfloat16 models: bf16 weights and activations).

The decode loop is a Python loop over steps (one forward of one token each, HF's growing
`DynamicCache`), leaving early once every row has emitted EOS; this is the reference
implementation, written for clarity, and runs under `torch.no_grad()`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from ppo_rlhf.rollout import check_mask
from ppo_rlhf.sampling import check_generate_args
from ppo_torch.losses import logprobs_from_logits

Tensor = torch.Tensor


class GenerationOutput(NamedTuple):
    """Sampled responses, RIGHT-padded."""

    response_ids: Tensor
    """[B, N] int64: the sampled tokens; pad_token_id after the first EOS."""
    response_mask: Tensor
    """[B, N] int32: 1 up to and including the first EOS, 0 after."""
    logprobs: Tensor
    """[B, N] float32: log softmax(logits / temperature) of each token (unfiltered); 0 at padding."""


# ---- the sampling rule ----------------------------------------------------------------------------
def filter_logits(scaled: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then top-p (nucleus) on temperature-scaled float32 logits [..., V]: dropped tokens
    become -inf. top-k keeps logits >= the k-th largest; top-p keeps the smallest sorted prefix
    whose mass is >= top_p (the top token always) plus anything tied with its last token.
    0 and 1 switch a filter off."""
    V = scaled.shape[-1]
    neg_inf = torch.tensor(-float("inf"), dtype=scaled.dtype, device=scaled.device)
    if top_k and top_k < V:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = torch.where(scaled >= kth, scaled, neg_inf)
    if top_p < 1.0:
        srt = torch.sort(scaled, dim=-1, descending=True).values  # -inf last
        p = torch.softmax(srt, dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass strictly before each sorted token
        n_keep = (before < top_p).sum(dim=-1, keepdim=True)  # >= 1 (before[0] == 0)
        thresh = torch.gather(srt, -1, n_keep - 1)
        scaled = torch.where(scaled >= thresh, scaled, neg_inf)
    return scaled


def sample_token(logits: Tensor, gumbel: Tensor | None, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """(token [B] int64, logprob [B] float32) from logits [B, V] by the rule of the module
    docstring; `gumbel` [B, V] float32 (ignored when greedy)."""
    logits = logits.float()
    if greedy:
        token = torch.argmax(logits, dim=-1)
    else:
        token = torch.argmax(filter_logits(logits / temperature, top_k, top_p) + gumbel, dim=-1)
    return token, logprobs_from_logits(logits, token, temperature)


def _gumbel(generator: torch.Generator | None, shape: tuple[int, int], device) -> Tensor:
    """Standard Gumbel draws -log(-log(u)), u ~ U[tiny, 1) (u = 0 would give -inf)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: torch.nn.Module, query_ids: Any, query_mask: Any, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0, greedy: bool = False,
             noise: Any = None, generator: torch.Generator | None = None,
             generator_rows: tuple[int, int] | None = None) -> GenerationOutput:
    """Sample up to `max_new_tokens` tokens after each LEFT-padded prompt; see the module
    docstring. `noise`: float32 [B, max_new_tokens, V] Gumbel draws (numpy or tensor);
    `generator`: a torch.Generator (None: torch's global RNG). ValueError on bad arguments
    (a query_mask that is not left-padded or has an empty row included)."""
    q_shape, m_shape = tuple(np.shape(query_ids)), tuple(np.shape(query_mask))
    source = check_generate_args(
        "ppo_torch.generate", q_shape, m_shape, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, greedy=greedy,
        noise_shape=None if noise is None else tuple(np.shape(noise)), has_random=True)
    device = _device(model)
    q = torch.as_tensor(np.asarray(query_ids) if not torch.is_tensor(query_ids) else query_ids,
                        device=device).long()
    qm = torch.as_tensor(np.asarray(query_mask) if not torch.is_tensor(query_mask) else query_mask,
                         device=device).long()
    check_mask("generate: query_mask", qm.cpu().numpy(), layout="left")
    if source == "noise":
        noise = torch.as_tensor(noise, dtype=torch.float32, device=device)
    B, N = q.shape[0], int(max_new_tokens)
    opts = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                greedy=source == "greedy")

    ids = torch.full((B, N), int(pad_token_id), dtype=torch.long, device=device)
    mask = torch.zeros((B, N), dtype=torch.int32, device=device)
    lps = torch.zeros((B, N), dtype=torch.float32, device=device)
    done = torch.zeros((B,), dtype=torch.bool, device=device)

    # prefill: the last prompt position's logits choose response token 0
    logits, cache = model(q, attention_mask=qm, use_cache=True, logits_to_keep=1)
    kv_mask = qm
    for t in range(N):
        if t > 0:  # feed token t - 1 (finished rows are fed pads; their outputs are unused)
            kv_mask = torch.cat([kv_mask, torch.ones((B, 1), dtype=kv_mask.dtype, device=device)], 1)
            logits, cache = model(ids[:, t - 1: t], attention_mask=kv_mask, cache=cache)
        step_logits = logits[:, -1]
        if source == "greedy":
            gumbel = None
        elif source == "noise":
            if noise.shape[-1] != step_logits.shape[-1]:
                raise ValueError(f"generate: noise has vocab dimension {noise.shape[-1]}, the "
                                 f"model's logits {step_logits.shape[-1]}")
            gumbel = noise[:, t]
        elif generator_rows is None:
            gumbel = _gumbel(generator, tuple(step_logits.shape), device)
        else:  # this rank's rows of the noise of the whole (data-parallel) batch
            first, total = generator_rows
            gumbel = _gumbel(generator, (total, step_logits.shape[-1]), device)[first: first + B]
        token, lp = sample_token(step_logits, gumbel, **opts)
        alive = ~done
        ids[:, t] = torch.where(alive, token, torch.full_like(token, int(pad_token_id)))
        mask[:, t] = alive.int()
        lps[:, t] = torch.where(alive, lp, torch.zeros_like(lp))
        if eos_token_id is not None:
            done = done | (alive & (token == int(eos_token_id)))
            if bool(done.all()):  # every row has finished: the rest stays padding
                break
    return GenerationOutput(ids, mask, lps)


__all__ = ["generate", "GenerationOutput", "filter_logits", "sample_token"]
