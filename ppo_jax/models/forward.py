"""Per-token log-probs, entropies, values and sequence scores of a (prompt, response) batch.
Mirror: `ppo_torch/models/forward.py`.

Layout (as `ppo_rlhf.rollout.RolloutBatch`): query_ids / query_mask [B, P], LEFT-padded;
response_ids / response_mask [B, R], RIGHT-padded. The model sees concat(query, response) with
attention mask concat(query_mask, response_mask). Response token t sits at position P + t and is
predicted by the logits at position P - 1 + t (the last prompt token predicts the first
response token); the critic's value of the state before token t is read at the same position
(as TRL). Every result is float32 and 0 at padded response positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppo_jax.losses import logprobs_from_logits, token_entropy
from ppo_rlhf.checks import check_same_shape

Array = jax.Array


def _concat(fn: str, query_ids, query_mask, response_ids,
            response_mask) -> tuple[Array, Array, int, int]:
    check_same_shape(fn, "query_ids", query_ids.shape, query_mask=query_mask)
    check_same_shape(fn, "response_ids", response_ids.shape, response_mask=response_mask)
    if query_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"{fn}: {query_ids.shape[0]} prompts but {response_ids.shape[0]} responses")
    ids = jnp.concatenate([jnp.asarray(query_ids), jnp.asarray(response_ids)], axis=1)
    mask = jnp.concatenate([jnp.asarray(query_mask), jnp.asarray(response_mask)], axis=1)
    return ids, mask, query_ids.shape[1], response_ids.shape[1]


def _response_slice(x: Array, P: int, R: int) -> Array:
    """Positions P - 1 ... P + R - 2 (those predicting / valuing response tokens 0 ... R - 1)."""
    return x[:, P - 1: P - 1 + R]


def response_logprobs(model, query_ids: Array, query_mask: Array, response_ids: Array,
                      response_mask: Array, *, temperature: float = 1.0,
                      return_entropy: bool = False) -> Array | tuple[Array, Array]:
    """log softmax(logits / temperature)[response token], [B, R] float32, 0 where response_mask
    is 0; with return_entropy, also the entropy of the same distribution [B, R]. `model` is
    anything called as model(ids, attention_mask=mask, logits_to_keep=n) -> logits (CausalLM,
    PolicyWithValueHead). Use the sampling temperature for policy AND reference (trl#2358)."""
    ids, mask, P, R = _concat("response_logprobs", query_ids, query_mask, response_ids, response_mask)
    # only the last R + 1 positions' logits are needed; the very last predicts past the response
    logits = model(ids, attention_mask=mask, logits_to_keep=R + 1)[:, :R]
    real = jnp.asarray(response_mask) != 0
    lp = jnp.where(real, logprobs_from_logits(logits, jnp.asarray(response_ids), temperature), 0.0)
    if not return_entropy:
        return lp
    return lp, jnp.where(real, token_entropy(logits, temperature), 0.0)


def response_values(value_model, query_ids: Array, query_mask: Array, response_ids: Array,
                    response_mask: Array) -> Array:
    """V(state before response token t) = the scalar head at position P - 1 + t, [B, R] float32,
    0 where response_mask is 0. `value_model`: ScalarHeadModel or PolicyWithValueHead."""
    ids, mask, P, R = _concat("response_values", query_ids, query_mask, response_ids, response_mask)
    values = _response_slice(value_model.values(ids, mask), P, R)
    return jnp.where(jnp.asarray(response_mask) != 0, values, 0.0)


def response_logprobs_and_values(model, query_ids: Array, query_mask: Array, response_ids: Array,
                                 response_mask: Array, *, temperature: float = 1.0,
                                 return_entropy: bool = False) -> tuple[Array, ...]:
    """(logprobs, values[, entropy]) of a shared-trunk `PolicyWithValueHead` from ONE forward
    pass; each [B, R] float32 exactly as `response_logprobs` and `response_values` compute them."""
    ids, mask, P, R = _concat("response_logprobs_and_values", query_ids, query_mask, response_ids,
                              response_mask)
    logits, values = model(ids, attention_mask=mask, return_values=True)
    logits, values = _response_slice(logits, P, R), _response_slice(values, P, R)
    real = jnp.asarray(response_mask) != 0
    lp = jnp.where(real, logprobs_from_logits(logits, jnp.asarray(response_ids), temperature), 0.0)
    out = (lp, jnp.where(real, values, 0.0))
    if return_entropy:
        out += (jnp.where(real, token_entropy(logits, temperature), 0.0),)
    return out


def sequence_scores(reward_model, query_ids: Array, query_mask: Array, response_ids: Array,
                    response_mask: Array) -> Array:
    """reward_model.score at the last real token of prompt + response, [B] float32 (the reward
    gain and bias applied). `reward_model`: a ScalarHeadModel."""
    ids, mask, _, _ = _concat("sequence_scores", query_ids, query_mask, response_ids, response_mask)
    return reward_model.score(ids, mask)
