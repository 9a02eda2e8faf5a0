"""Scalar heads: the value / reward model (`ScalarHeadModel`) and a policy with a value head on a
shared trunk (`PolicyWithValueHead`). Mirror: `ppo_jax/models/heads.py`.

`ScalarHeadModel` wraps a `transformers` `*ForSequenceClassification` with num_labels=1 (see
`ppo_rlhf.hf_checkpoint`): its backbone + `score` [H -> 1], no bias, and the output normalisation
reward_gain / reward_bias (config.json; 1 / 0 unless a reward-model trainer normalised it). We
do not use HF's own pooling (it finds the last token from pad_token_id, which may equal EOS):
  * values(ids, mask) -> [B, T]: reward_gain * head + reward_bias at every position (the
    critic, as TRL's value model; like OpenRLHF's critic, it applies the normalisation);
  * score(ids, mask)  -> [B]: values at the last position where mask == 1 (the reward model).
Both in float32. `critic_from_reward_model(rm)` makes a critic whose values start as rm's scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ppo_rlhf.config import ModelOptions
from ppo_rlhf.rewards import ScoreRequest
from ppo_torch.masked import last_token_index
from ppo_torch.models.causal_lm import CausalLM, backbone_hidden, build_with, project, token_stats

Tensor = torch.Tensor


def _ids_and_mask(input_ids: Any, attention_mask: Any, device) -> tuple[Tensor, Tensor | None]:
    """(ids, mask) from either tensors or a ScoreRequest (prompt + response concatenated)."""
    if isinstance(input_ids, ScoreRequest):
        r = input_ids
        ids = torch.cat([torch.as_tensor(r.query_ids), torch.as_tensor(r.response_ids)], dim=1)
        mask = torch.cat([torch.as_tensor(r.query_mask), torch.as_tensor(r.response_mask)], dim=1)
        return ids.to(device), mask.to(device)
    ids = torch.as_tensor(input_ids, device=device)
    return ids, None if attention_mask is None else torch.as_tensor(attention_mask, device=device)


class ScalarHeadModel(nn.Module):
    """A `*ForSequenceClassification` (num_labels=1) as the value model and the reward model."""

    def __init__(self, hf_model: nn.Module, *, reward_gain: float = 1.0, reward_bias: float = 0.0,
                 options: ModelOptions | None = None):
        super().__init__()
        self.hf_model = hf_model
        build_with(self, options)
        self.reward_gain = float(reward_gain)
        self.reward_bias = float(reward_bias)

    @property
    def config(self):
        return self.hf_model.config

    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               positions: Tensor | None = None) -> Tensor:
        """reward_gain * head + reward_bias at every position, [B, T] float32."""
        hidden, _ = backbone_hidden(self.hf_model, input_ids, attention_mask, positions,
                                    compute_dtype=self.compute_dtype)
        return self.reward_gain * project(hidden, self.hf_model.score.weight)[..., 0] + self.reward_bias

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                positions: Tensor | None = None) -> Tensor:
        return self.values(input_ids, attention_mask, positions=positions)

    def score(self, input_ids: Tensor | ScoreRequest, attention_mask: Tensor | None = None) -> Tensor:
        """Reward [B] float32: `values` (gain * head + bias) at the last real token. Also accepts a
        `ppo_rlhf.rewards.ScoreRequest` (prompt and response are concatenated), so a loaded
        reward model satisfies the `RewardModel` protocol."""
        device = self.hf_model.score.weight.device
        ids, mask = _ids_and_mask(input_ids, attention_mask, device)
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.long, device=device)
        v = self.values(ids, mask)
        return torch.gather(v, 1, last_token_index(mask)[:, None])[:, 0]


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
    the reward model's: the SAME tensors, not a copy (the trunk is in memory once); its head is
    a new tensor. Without LoRA every weight trains: a copy."""
    from ppo_torch.models.precision import rebuild  # precision.py builds heads: imported here

    lora = (reward_model.options if options is None else options).lora
    critic = rebuild(reward_model, options=options, copy=not lora)
    if not critic.options.lora:  # with LoRA: the adapters and the head (`lora.apply_lora`)
        critic.requires_grad_(True)
    with torch.no_grad():  # out of place: a LoRA critic's head must not write the reward model's
        head = critic.hf_model.score.weight
        head.data = head.detach() * reward_model.reward_gain
    critic.reward_gain, critic.reward_bias = 1.0, reward_model.reward_bias
    return critic


class PolicyWithValueHead(nn.Module):
    """A policy and its critic on one shared trunk: `lm` (a CausalLM) + `value_head` [H -> 1].

    model(ids, mask) -> logits, as a CausalLM (so generation and `response_logprobs` take it
    as is, KV cache included); model(ids, mask, return_values=True) -> (logits, values [B, T])
    from ONE trunk pass; model.values(ids, mask) -> values. `value_head` is a [1, H] array
    (`ppo_rlhf.hf_checkpoint.init_score_head(H, seed)` for a fresh one)."""

    def __init__(self, lm: CausalLM, value_head: Any):
        super().__init__()
        self.lm = lm
        hidden_size = lm.hf_model.get_output_embeddings().weight.shape[1]
        w = np.asarray(value_head, dtype=np.float32)
        if w.shape != (1, hidden_size):
            raise ValueError(f"value_head must have shape (1, {hidden_size}), got {w.shape}")
        ref = lm.hf_model.get_output_embeddings().weight
        self.value_head = nn.Linear(hidden_size, 1, bias=False, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            self.value_head.weight.copy_(torch.from_numpy(w))

    @property
    def config(self):
        return self.lm.config

    @property
    def options(self) -> ModelOptions:
        """The trunk's options (`CausalLM.options`)."""
        return self.lm.options

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                return_values: bool = False, positions: Tensor | None = None, cache=None,
                use_cache: bool = False, logits_to_keep: int = 0, labels: Tensor | None = None,
                temperature: float = 1.0, chunk: int = 0, return_entropy: bool = False):
        """As `CausalLM.forward`; return_values=True: (logits, values [B, T]) from one trunk
        pass, or with `labels` [B, R], (log-probs, entropy or None, values) [B, R] of the
        positions predicting them (`causal_lm.token_stats`)."""
        if not return_values:
            return self.lm(input_ids, attention_mask, positions=positions, cache=cache,
                           use_cache=use_cache, logits_to_keep=logits_to_keep, labels=labels,
                           temperature=temperature, chunk=chunk, return_entropy=return_entropy)
        if cache is not None or use_cache or logits_to_keep:
            raise ValueError("return_values=True computes every position without a cache")
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask, positions=positions)
        if labels is not None:
            hidden = hidden[:, -labels.shape[1] - 1:-1]
            lp, ent = token_stats(self.lm.logits_from_hidden, hidden, labels, temperature, chunk,
                                  return_entropy)
            return lp, ent, project(hidden, self.value_head.weight)[..., 0]
        return self.lm.logits_from_hidden(hidden), project(hidden, self.value_head.weight)[..., 0]

    def values(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               positions: Tensor | None = None) -> Tensor:
        hidden, _ = self.lm.hidden_states(input_ids, attention_mask, positions=positions)
        return project(hidden, self.value_head.weight)[..., 0]
