"""Scalar heads: the value / reward model (`ScalarHeadModel`) and a policy with a value head on a
shared trunk (`PolicyWithValueHead`). Mirror: `ppo_torch/models/heads.py`.

`ScalarHeadModel` is the on-disk format `*ForSequenceClassification` with num_labels=1 (see
`ppo_rlhf.hf_checkpoint`): a backbone + `score` [H -> 1], no bias, and the output normalisation
reward_gain / reward_bias (config.json; 1 / 0 unless a reward-model trainer normalised it):
  * values(ids, mask) -> [B, T]: reward_gain * head + reward_bias at every position (the
    critic, as TRL's value model; like OpenRLHF's critic, it applies the normalisation);
  * score(ids, mask)  -> [B]: values at the last position where mask == 1 (the reward model).
    The last real token is found from the MASK, never from pad_token_id (pad may equal EOS).
Both in float32. `critic_from_reward_model(rm)` makes a critic whose values start as rm's scores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.abstract import is_abstract
from ppo_jax.masked import last_token_index
from ppo_jax.models.causal_lm import CausalLM, make_backbone, project
from ppo_jax.models.config import ModelConfig
from ppo_jax.models.layers import Cache, linear
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.rewards import ScoreRequest

Array = jax.Array


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
        """reward_gain * head + reward_bias at every position, [B, T] float32."""
        hidden, _ = self.backbone(input_ids, attention_mask, positions=positions)
        return self.reward_gain * project(hidden, self.score_head.kernel[...])[..., 0] + self.reward_bias

    __call__ = values

    def score(self, input_ids: Array | ScoreRequest, attention_mask: Array | None = None) -> Array:
        """Reward [B] float32: `values` (gain * head + bias) at the last real token. Also accepts a
        `ppo_rlhf.rewards.ScoreRequest` (prompt and response are concatenated), so a loaded
        reward model satisfies the `RewardModel` protocol."""
        ids, mask = _ids_and_mask(input_ids, attention_mask)
        if mask is None:
            mask = jnp.ones(ids.shape, jnp.int32)
        v = self.values(ids, mask)
        return jnp.take_along_axis(v, last_token_index(mask)[:, None], axis=1)[:, 0]


def critic_from_reward_model(reward_model: ScalarHeadModel, *,
                             options: ModelOptions | None = None) -> ScalarHeadModel:
    """A trainable copy of `reward_model` as the critic, built with `options` (default: the
    reward model's), on the reward's scale: its values equal the reward model's normalised
    scores (gain * head + bias) at every position. The gain is folded into the head's weights
    (gain 1 after), so AdamW moves values at the same speed whatever the normalisation; the bias
    stays a constant offset. Without this, a critic that reads the raw head starts off by
    (gain - 1) * head + bias at the EOS token, where GAE's terminal step does not cancel it:
    every advantage is biased by that offset times (gamma * lam)^(T - t).

    A LoRA critic (`options.lora`) trains only its adapters and head, so its base weights stay
    the reward model's: the SAME arrays, not a copy (the trunk is in memory once); its head is a
    new array. Without LoRA every weight trains: a copy."""
    from ppo_jax.models.precision import rebuild  # precision.py builds heads: imported here

    lora = (reward_model.config.options if options is None else options).lora
    critic = rebuild(reward_model, options=options, copy=not lora)
    kernel = critic.score_head.kernel.get_value()
    if is_abstract(nnx.state(critic)):  # planning: no values to scale, but its own (new) array
        critic.score_head.kernel.set_value(jax.ShapeDtypeStruct(kernel.shape, kernel.dtype,
                                                                sharding=kernel.sharding))
    else:
        critic.score_head.kernel[...] = (kernel * reward_model.reward_gain).astype(kernel.dtype)
    critic.reward_gain, critic.reward_bias = 1.0, reward_model.reward_bias
    return critic


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
        return self.lm.logits_from_hidden(hidden), self.values_from_hidden(hidden)

    def values(self, input_ids: Array, attention_mask: Array | None = None, *,
               positions: Array | None = None) -> Array:
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask, positions=positions)
        return self.values_from_hidden(hidden)

    def values_from_hidden(self, hidden: Array) -> Array:
        """The value head in float32: [..., H] -> [...]."""
        return project(hidden, self.value_head.kernel[...])[..., 0]

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> Cache:
        return self.lm.init_cache(batch_size, max_len, dtype)
