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


def _lm(model):
    """The `CausalLM` of a model (a `PolicyWithValueHead`'s `lm`, or the model itself)."""
    return getattr(model, "lm", model)


def _chunk_stats(lm, hidden: Array, labels: Array, temperature: float, chunk: int,
                 return_entropy: bool) -> tuple[Array, Array | None]:
    """Log-probs (and entropies) [B, R] from the final hidden states [B, R, H] of the positions
    predicting the R response tokens, `chunk` positions at a time.

    The R positions are padded up to n * chunk (static shapes: padding rows have zero hidden
    states and label 0, and are sliced off), and `lax.map` runs the LM head + float32
    log-softmax (+ entropy) over the n chunks inside `jax.checkpoint`: the forward keeps only
    each chunk's [B, chunk] results, and the backward recomputes one chunk's [B, chunk, V]
    float32 logits at a time -- no [B, R, V] tensor is ever live. The arithmetic of each
    position is the unchunked one (same head, same temperature, same reductions over V), so
    values agree up to the float32 rounding of differently fused / blocked kernels; the LM
    head's weight gradient is summed over chunks instead of in one matmul (float32
    reassociation; both tested)."""
    B, R, H = hidden.shape
    chunk = min(chunk, R)  # one chunk of R rows: no padding
    n = -(-R // chunk)
    pad = n * chunk - R
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(jnp.asarray(labels, jnp.int32), ((0, 0), (0, pad)))
    # [n, B, chunk, ...]: the chunk axis leads, for lax.map
    hs = hidden.reshape(B, n, chunk, H).swapaxes(0, 1)
    ls = labels.reshape(B, n, chunk).swapaxes(0, 1)
    kernel = lm.head_kernel()

    @jax.checkpoint
    def one(kernel, h, l):
        logits = lm.project_head(h, kernel)
        lp = logprobs_from_logits(logits, l, temperature)
        return (lp, token_entropy(logits, temperature)) if return_entropy else (lp,)

    out = jax.lax.map(lambda xs: one(kernel, *xs), (hs, ls))
    out = [o.swapaxes(0, 1).reshape(B, n * chunk)[:, :R] for o in out]
    return out[0], (out[1] if return_entropy else None)


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"chunk={chunk!r} is invalid: allowed an integer >= 0 (0 = no chunking)")
    return chunk


def response_logprobs(model, query_ids: Array, query_mask: Array, response_ids: Array,
                      response_mask: Array, *, temperature: float = 1.0,
                      return_entropy: bool = False, chunk: int = 0) -> Array | tuple[Array, Array]:
    """log softmax(logits / temperature)[response token], [B, R] float32, 0 where response_mask
    is 0; with return_entropy, also the entropy of the same distribution [B, R]. `model` is
    anything called as model(ids, attention_mask=mask, logits_to_keep=n) -> logits (CausalLM,
    PolicyWithValueHead). Use the sampling temperature for policy AND reference (trl#2358).

    chunk > 0 (`PPOConfig.logprob_chunk`): the LM head and log-softmax run over `chunk`
    response positions at a time (`_chunk_stats`), so the float32 [B, R, V] logits are never
    materialised, forward or backward; same values, gradients equal up to float32 rounding."""
    ids, mask, P, R = _concat("response_logprobs", query_ids, query_mask, response_ids, response_mask)
    real = jnp.asarray(response_mask) != 0
    if _check_chunk(chunk):
        lm = _lm(model)
        hidden, _ = lm.hidden_states(ids, mask)
        lp, ent = _chunk_stats(lm, _response_slice(hidden, P, R), jnp.asarray(response_ids),
                               temperature, chunk, return_entropy)
    else:
        # only the last R + 1 positions' logits are needed; the very last predicts past the response
        logits = model(ids, attention_mask=mask, logits_to_keep=R + 1)[:, :R]
        lp = logprobs_from_logits(logits, jnp.asarray(response_ids), temperature)
        ent = token_entropy(logits, temperature) if return_entropy else None
    lp = jnp.where(real, lp, 0.0)
    if not return_entropy:
        return lp
    return lp, jnp.where(real, ent, 0.0)


def response_values(value_model, query_ids: Array, query_mask: Array, response_ids: Array,
                    response_mask: Array) -> Array:
    """V(state before response token t) = the scalar head at position P - 1 + t, [B, R] float32,
    0 where response_mask is 0. `value_model`: ScalarHeadModel or PolicyWithValueHead."""
    ids, mask, P, R = _concat("response_values", query_ids, query_mask, response_ids, response_mask)
    values = _response_slice(value_model.values(ids, mask), P, R)
    return jnp.where(jnp.asarray(response_mask) != 0, values, 0.0)


def response_logprobs_and_values(model, query_ids: Array, query_mask: Array, response_ids: Array,
                                 response_mask: Array, *, temperature: float = 1.0,
                                 return_entropy: bool = False, chunk: int = 0) -> tuple[Array, ...]:
    """(logprobs, values[, entropy]) of a shared-trunk `PolicyWithValueHead` from ONE forward
    pass; each [B, R] float32 exactly as `response_logprobs` and `response_values` compute them
    (`chunk` as there)."""
    ids, mask, P, R = _concat("response_logprobs_and_values", query_ids, query_mask, response_ids,
                              response_mask)
    real = jnp.asarray(response_mask) != 0
    if _check_chunk(chunk):
        hidden, _ = model.lm.hidden_states(ids, mask)
        hidden = _response_slice(hidden, P, R)
        values = model.values_from_hidden(hidden)
        lp, ent = _chunk_stats(model.lm, hidden, jnp.asarray(response_ids), temperature, chunk,
                               return_entropy)
    else:
        logits, values = model(ids, attention_mask=mask, return_values=True)
        logits, values = _response_slice(logits, P, R), _response_slice(values, P, R)
        lp = logprobs_from_logits(logits, jnp.asarray(response_ids), temperature)
        ent = token_entropy(logits, temperature) if return_entropy else None
    out = (jnp.where(real, lp, 0.0), jnp.where(real, values, 0.0))
    if return_entropy:
        out += (jnp.where(real, ent, 0.0),)
    return out


def sequence_scores(reward_model, query_ids: Array, query_mask: Array, response_ids: Array,
                    response_mask: Array) -> Array:
    """reward_model.score at the last real token of prompt + response, [B] float32 (the reward
    gain and bias applied). `reward_model`: a ScalarHeadModel."""
    ids, mask, _, _ = _concat("sequence_scores", query_ids, query_mask, response_ids, response_mask)
    return reward_model.score(ids, mask)
