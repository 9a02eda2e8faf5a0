"""Language models in PyTorch: Hugging Face `transformers` GPT-2, Llama, Qwen2, GPT-NeoX behind
the same API as `ppo_jax.models`; value / reward heads; log-probs.

    lm = load_pretrained("ckpt/", dtype="float32")          # CausalLM (lm.hf_model: the HF model)
    logits = lm(input_ids, attention_mask=mask)              # [B, T, V] float32
    rm = load_scalar_model("rm/")                            # ScalarHeadModel
    scores = rm.score(input_ids, mask)                       # [B]
    critic = scalar_model_from_lm("ckpt/", seed=0)           # fresh head, same in both backends
    lp = response_logprobs(lm, q_ids, q_mask, r_ids, r_mask, temperature=0.7)
    save_pretrained(lm, "out/")
    lm = load_pretrained("ckpt/", options=ModelOptions(remat="dots", compute_dtype="bfloat16"))
    lm = load_pretrained("ckpt/", options=ModelOptions(lora_rank=8))   # LoRA adapters (lora.py, peft)
    # activation checkpointing and mixed precision: fixed at construction

KV cache: HF's own Cache through `lm(..., use_cache=True)` / `lm(..., cache=cache)`; see
`ppo_torch.models.causal_lm`.
"""

import sys

from ppo_rlhf.config import ModelOptions
from ppo_rlhf.hf_checkpoint import SUPPORTED_MODEL_TYPES, init_score_head
from ppo_rlhf.runtime.roles import ModelKit
from ppo_torch.models.causal_lm import CausalLM
from ppo_torch.models.forward import response_logprobs, response_logprobs_and_values, response_values, sequence_scores
from ppo_torch.models.heads import PolicyWithValueHead, ScalarHeadModel, critic_from_reward_model, last_token_index
from ppo_torch.models.loading import (
                                      disable_dropout,
                                      load_pretrained,
                                      load_scalar_model,
                                      model_tensors,
                                      save_pretrained,
                                      scalar_model_from_lm,
)
from ppo_torch.models.lora import (
    adapter_options,
    adapter_tensors,
    adapters_disabled,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from ppo_torch.models.precision import cast_model, model_options, rebuild
from ppo_torch.models.remat import REMAT_POLICIES

# scan_unroll: the layers are a Python loop already, there is no scan to unroll
MODEL_KIT = ModelKit.of(sys.modules[__name__], unused_options=("scan_unroll",))
"""What building the PPO roles asks of this package (`ppo_rlhf.runtime.roles`)."""

__all__ = [
    "MODEL_KIT",
    "CausalLM", "ScalarHeadModel", "PolicyWithValueHead",
    "load_pretrained", "load_scalar_model", "scalar_model_from_lm", "save_pretrained",
    "model_tensors", "response_logprobs", "response_values", "response_logprobs_and_values",
    "sequence_scores", "last_token_index", "critic_from_reward_model", "init_score_head", "disable_dropout",
    "SUPPORTED_MODEL_TYPES", "REMAT_POLICIES", "ModelOptions", "model_options", "rebuild", "cast_model",
    "adapters_disabled", "save_adapter", "load_adapter", "adapter_options", "adapter_tensors",
    "merge_adapters",
]
