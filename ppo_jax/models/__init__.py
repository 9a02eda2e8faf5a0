"""Language models in Flax NNX: GPT-2, Llama, Qwen2, GPT-NeoX; value / reward heads; log-probs.
Mirror: `ppo_torch.models` (same public names; torch wraps `transformers`, we implement the
architectures ourselves in gpt2.py, llama.py, gpt_neox.py and load the same checkpoints).

    lm = load_pretrained("ckpt/", dtype="float32")          # CausalLM
    logits = lm(input_ids, attention_mask=mask)              # [B, T, V] float32
    rm = load_scalar_model("rm/")                            # ScalarHeadModel
    scores = rm.score(input_ids, mask)                       # [B]
    critic = scalar_model_from_lm("ckpt/", seed=0)           # fresh head, same in both backends
    lp = response_logprobs(lm, q_ids, q_mask, r_ids, r_mask, temperature=0.7)
    save_pretrained(lm, "out/")                              # loads in transformers
    lm = load_pretrained("ckpt/", options=ModelOptions(remat="dots", scan_unroll=True,
                                                       compute_dtype="bfloat16"))
    # activation checkpointing, the layer scan unrolled, mixed precision: fixed at construction
    lm = load_pretrained("ckpt/", options=ModelOptions(lora_rank=8))   # LoRA adapters (lora.py)

Each model's blocks are one stacked module run by a scan (`ppo_jax.models.stack`); KV-cache
calling convention: see `ppo_jax.models.causal_lm`.
"""

import sys

from ppo_jax.models.causal_lm import CausalLM
from ppo_jax.models.config import ModelConfig
from ppo_jax.models.forward import response_logprobs, response_logprobs_and_values, response_values, sequence_scores
from ppo_jax.models.heads import PolicyWithValueHead, ScalarHeadModel, critic_from_reward_model, last_token_index
from ppo_jax.models.layers import Cache, LayerCache
from ppo_jax.models.loading import (
                                    load_pretrained,
                                    load_scalar_model,
                                    model_tensors,
                                    save_pretrained,
                                    scalar_model_from_lm,
)
from ppo_jax.models.lora import (
                                 ADAPTER_PARAMS,
                                 BASE_PARAMS,
                                 LoRALinear,
                                 adapter_options,
                                 adapter_tensors,
                                 adapters_disabled,
                                 load_adapter,
                                 merge_adapters,
                                 save_adapter,
)
from ppo_jax.models.precision import cast_model, model_options, rebuild
from ppo_jax.models.stack import REMAT_POLICIES, ScannedBlocks
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.hf_checkpoint import SUPPORTED_MODEL_TYPES, init_score_head
from ppo_rlhf.runtime.roles import ModelKit

MODEL_KIT = ModelKit.of(sys.modules[__name__])
"""What building the PPO roles asks of this package (`ppo_rlhf.runtime.roles`)."""

__all__ = [
    "MODEL_KIT",
    "CausalLM", "ScalarHeadModel", "PolicyWithValueHead", "ModelConfig", "Cache", "LayerCache",
    "load_pretrained", "load_scalar_model", "scalar_model_from_lm", "save_pretrained",
    "model_tensors", "response_logprobs", "response_values", "response_logprobs_and_values",
    "sequence_scores", "last_token_index", "critic_from_reward_model", "init_score_head", "SUPPORTED_MODEL_TYPES",
    "ScannedBlocks", "REMAT_POLICIES", "ModelOptions", "model_options", "rebuild", "cast_model",
    "adapters_disabled", "save_adapter", "load_adapter", "adapter_options", "adapter_tensors",
    "LoRALinear", "ADAPTER_PARAMS", "BASE_PARAMS", "merge_adapters",
]
