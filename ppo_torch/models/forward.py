"""Per-token log-probs, entropies, values and sequence scores of a (prompt, response) batch.
Mirror: `ppo_jax/models/forward.py`.

Layout (as `ppo_rlhf.rollout.RolloutBatch`): query_ids / query_mask [B, P], LEFT-padded;
response_ids / response_mask [B, R], RIGHT-padded. The model sees concat(query, response) with
attention mask concat(query_mask, response_mask). Response token t sits at position P + t and is
predicted by the logits at position P - 1 + t (the last prompt token predicts the first
response token); the critic's value of the state before token t is read at the same position
(as TRL). Every result is float32 and 0 at padded response positions.
"""

from __future__ import annotations

import torch

from ppo_rlhf.checks import check_same_shape
from ppo_torch.losses import logprobs_from_logits, token_entropy

Tensor = torch.Tensor


def _concat(fn: str, query_ids, query_mask, response_ids,
            response_mask) -> tuple[Tensor, Tensor, int, int]:
    check_same_shape(fn, "query_ids", query_ids.shape, query_mask=query_mask)
    check_same_shape(fn, "response_ids", response_ids.shape, response_mask=response_mask)
    if query_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"{fn}: {query_ids.shape[0]} prompts but {response_ids.shape[0]} responses")
    ids = torch.cat([torch.as_tensor(query_ids), torch.as_tensor(response_ids)], dim=1).long()
    mask = torch.cat([torch.as_tensor(query_mask), torch.as_tensor(response_mask)], dim=1).long()
    return ids, mask, query_ids.shape[1], response_ids.shape[1]


def _response_slice(x: Tensor, P: int, R: int) -> Tensor:
    """Positions P - 1 ... P + R - 2 (those predicting / valuing response tokens 0 ... R - 1)."""
    return x[:, P - 1: P - 1 + R]


def _zero_pad(x: Tensor, real: Tensor) -> Tensor:
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk={chunk!r} is invalid: allowed an integer >= 0 (0 = no chunking)")
    return chunk


def response_logprobs(model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, *, temperature: float = 1.0,
                      return_entropy: bool = False, chunk: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(logits / temperature)[response token], [B, R] float32, 0 where response_mask
    is 0; with return_entropy, also the entropy of the same distribution [B, R]. `model` is
    anything called as model(ids, attention_mask=mask, logits_to_keep=n) -> logits (CausalLM,
    PolicyWithValueHead). Use the sampling temperature for policy AND reference (trl#2358).

    chunk > 0 (`PPOConfig.logprob_chunk`): the LM head and log-softmax run over `chunk`
    response positions at a time (`causal_lm.token_stats`, called through the model's forward),
    so the float32 [B, R, V] logits are never materialised, forward or backward; same values,
    gradients equal up to float32 rounding."""
    ids, mask, P, R = _concat("response_logprobs", query_ids, query_mask, response_ids, response_mask)
    real = torch.as_tensor(response_mask).to(ids.device) != 0
    labels = torch.as_tensor(response_ids).to(ids.device).long()
    if _check_chunk(chunk):
        lp, ent = model(ids, attention_mask=mask, labels=labels, temperature=temperature,
                        chunk=chunk, return_entropy=return_entropy)
    else:
        # only the last R + 1 positions' logits are needed; the very last predicts past the response
        logits = model(ids, attention_mask=mask, logits_to_keep=R + 1)[:, :R]
        real, labels = real.to(logits.device), labels.to(logits.device)
        lp = logprobs_from_logits(logits, labels, temperature)
        ent = token_entropy(logits, temperature) if return_entropy else None
    lp = _zero_pad(lp, real.to(lp.device))
    if not return_entropy:
        return lp
    return lp, _zero_pad(ent, real.to(ent.device))


def response_values(value_model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """V(state before response token t) = the scalar head at position P - 1 + t, [B, R] float32,
    0 where response_mask is 0. `value_model`: ScalarHeadModel or PolicyWithValueHead."""
    ids, mask, P, R = _concat("response_values", query_ids, query_mask, response_ids, response_mask)
    values = _response_slice(value_model.values(ids, mask), P, R)
    return _zero_pad(values, torch.as_tensor(response_mask).to(values.device) != 0)


def response_logprobs_and_values(model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                                 response_mask: Tensor, *, temperature: float = 1.0,
                                 return_entropy: bool = False, chunk: int = 0) -> tuple[Tensor, ...]:
    """(logprobs, values[, entropy]) of a shared-trunk `PolicyWithValueHead` from ONE forward
    pass; each [B, R] float32 exactly as `response_logprobs` and `response_values` compute them
    (`chunk` as there)."""
    ids, mask, P, R = _concat("response_logprobs_and_values", query_ids, query_mask, response_ids,
                              response_mask)
    labels = torch.as_tensor(response_ids).to(ids.device).long()
    if _check_chunk(chunk):
        lp, ent, values = model(ids, attention_mask=mask, return_values=True, labels=labels,
                                temperature=temperature, chunk=chunk, return_entropy=return_entropy)
    else:
        logits, values = model(ids, attention_mask=mask, return_values=True)
        logits, values = _response_slice(logits, P, R), _response_slice(values, P, R)
        labels = labels.to(logits.device)
        lp = logprobs_from_logits(logits, labels, temperature)
        ent = token_entropy(logits, temperature) if return_entropy else None
    real = torch.as_tensor(response_mask).to(lp.device) != 0
    out = (_zero_pad(lp, real), _zero_pad(values, real))
    if return_entropy:
        out += (_zero_pad(ent, real),)
    return out


def sequence_scores(reward_model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """reward_model.score at the last real token of prompt + response, [B] float32 (the reward
    gain and bias applied). `reward_model`: a ScalarHeadModel."""
    ids, mask, _, _ = _concat("sequence_scores", query_ids, query_mask, response_ids, response_mask)
    return reward_model.score(ids, mask)
