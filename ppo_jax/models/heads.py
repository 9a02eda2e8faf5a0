"""Scalar heads: the value / reward model (`ScalarHeadModel`) and a policy with a value head on a
shared trunk (`PolicyWithValueHead`). Mirror: `ppo_torch/models/heads.py`.

`ScalarHeadModel` is the on-disk format `*ForSequenceClassification` with num_labels=1 (see
`ppo_rlhf.hf_checkpoint`): a backbone + `score` [H -> 1], no bias.
  * values(ids, mask) -> [B, T]: the head at every position (the critic, as TRL's value model);
  * score(ids, mask)  -> [B]: reward_gain * head(h at the last position where mask == 1)
    + reward_bias (the reward model). The last real token is found from the MASK, never from
    pad_token_id (pad may equal EOS).
Both in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.models.causal_lm import CausalLM, make_backbone, project
from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import Cache, linear
from ppo_rlhf.rewards import ScoreRequest

Array = jax.Array


def last_token_index(attention_mask: Array) -> Array:
    """[B, T] -> [B]: index of the last position where the mask is 1 (T - 1 for an all-zero row)."""
    T = attention_mask.shape[-1]
    return T - 1 - jnp.argmax(jnp.flip(attention_mask != 0, axis=-1), axis=-1)


def _ids_and_mask(input_ids: Any, attention_mask: Any) -> tuple[Array, Array | None]:
    """(ids, mask) from either arrays or a ScoreRequest (prompt + response concatenated)."""
    if isinstance(input_ids, ScoreRequest):
        r = input_ids
        ids = jnp.concatenate([jnp.asarray(r.query_ids), jnp.asarray(r.response_ids)], axis=1)
        mask = jnp.concatenate([jnp.asarray(r.query_mask), jnp.asarray(r.response_mask)], axis=1)
        return ids, mask
    return jnp.asarray(input_ids), None if attention_mask is None else jnp.asarray(attention_mask)


class ScalarHeadModel(nnx.Module):
    """Backbone + scalar head: the value model and the reward model."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, reward_gain: float = 1.0,
                 reward_bias: float = 0.0):
        self.config = config
        self.backbone = make_backbone(config, rngs)
        self.score_head = linear(config.hidden_size, 1, use_bias=False, config=config, rngs=rngs)
        self.reward_gain = float(reward_gain)
        self.reward_bias = float(reward_bias)

    def values(self, input_ids: Array, attention_mask: Array | None = None, *,
               positions: Array | None = None) -> Array:
        """The head at every position, [B, T] float32 (no gain/bias)."""
        hidden, _ = self.backbone(input_ids, attention_mask, positions=positions)
        return project(hidden, self.score_head.kernel[...])[..., 0]

    __call__ = values

    def score(self, input_ids: Array | ScoreRequest, attention_mask: Array | None = None) -> Array:
        """Reward [B] float32: gain * head at the last real token + bias. Also accepts a
        `ppo_rlhf.rewards.ScoreRequest` (prompt and response are concatenated), so a loaded
        reward model satisfies the `RewardModel` protocol."""
        ids, mask = _ids_and_mask(input_ids, attention_mask)
        if mask is None:
            mask = jnp.ones(ids.shape, jnp.int32)
        v = self.values(ids, mask)
        last = jnp.take_along_axis(v, last_token_index(mask)[:, None], axis=1)[:, 0]
        return self.reward_gain * last + self.reward_bias


class PolicyWithValueHead(nnx.Module):
    """A policy and its critic on one shared trunk: `lm` (a CausalLM) + `value_head` [H -> 1].

    model(ids, mask) -> logits, as a CausalLM (so generation and `response_logprobs` take it
    as is, KV cache included); model(ids, mask, return_values=True) -> (logits, values [B, T])
    from ONE trunk pass; model.values(ids, mask) -> values. `value_head` is a [1, H] array
    (`ppo_rlhf.hf_checkpoint.init_score_head(H, seed)` for a fresh one)."""

    def __init__(self, lm: CausalLM, value_head: Any):
        self.config = lm.config
        self.lm = lm
        w = np.asarray(value_head, dtype=np.float32)
        if w.shape != (1, lm.config.hidden_size):
            raise ValueError(f"value_head must have shape (1, {lm.config.hidden_size}), got {w.shape}")
        self.value_head = linear(lm.config.hidden_size, 1, use_bias=False, config=lm.config,
                                 rngs=nnx.Rngs(0))
        self.value_head.kernel[...] = jnp.asarray(w.T, dtype=self.value_head.kernel[...].dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None, *,
                 return_values: bool = False, positions: Array | None = None,
                 cache: Cache | None = None, cache_index=None, logits_to_keep: int = 0):
        if not return_values:
            return self.lm(input_ids, attention_mask, positions=positions, cache=cache,
                           cache_index=cache_index, logits_to_keep=logits_to_keep)
        if cache is not None or logits_to_keep:
            raise ValueError("return_values=True computes every position without a cache")
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask, positions=positions)
        return self.lm.logits_from_hidden(hidden), project(hidden, self.value_head.kernel[...])[..., 0]

    def values(self, input_ids: Array, attention_mask: Array | None = None, *,
               positions: Array | None = None) -> Array:
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask, positions=positions)
        return project(hidden, self.value_head.kernel[...])[..., 0]

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
        return self.lm.init_cache(batch_size, max_len, dtype)
