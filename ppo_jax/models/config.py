"""`ModelConfig`: what our Flax NNX models need from a Hugging Face `config.json`.

One frozen dataclass for every supported architecture (gpt2, llama, qwen2, gpt_neox); fields an
architecture does not use keep their defaults. `ModelConfig.from_hf(config_dict)` reads both the
transformers-5 layout (`rope_parameters` = {rope_type, rope_theta, partial_rotary_factor, ...})
and the older one (`rope_theta`, `rope_scaling`, GPT-NeoX's `rotary_pct` / `rotary_emb_base`),
so checkpoints from the Hub load too. The raw dict is kept (`hf_config`) and written back
unchanged when a model is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import jax

from ppo_rlhf.config import ModelOptions
from ppo_rlhf.hf_checkpoint import check_model_type

DTYPES = ("float32", "bfloat16", "float64")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    dtype: str = "float32"
    """Weights and activations: "float32", "bfloat16", or "float64" (for numerics checks: needs
    jax_enable_x64). Norms, softmaxes and logits run in float32 -- in float64 for a float64
    model (`layers.upcast`)."""
    options: ModelOptions = field(default_factory=ModelOptions)
    """How the model runs (`ppo_rlhf.config.ModelOptions`: remat, scan_unroll, compute_dtype),
    given when it is built (`load_pretrained(path, options=...)`, `ModelConfig.from_hf`) and
    static: part of every graphdef, so the jitted programs are specialised on it. Mixed
    precision (`compute_dtype`): every projection (`layers.linear`, the LM head) casts its input
    and weight to it, accumulating in float32; the weights stay in `dtype`. As `torch.autocast`:
    the embeddings, the residual stream and the norms stay in `dtype`, only the matmuls' inputs
    are rounded (so the matmul outputs, attention and the MLP activations are in compute_dtype);
    logits are float32 (`precision.py`)."""
    # biases
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # rotary embeddings (llama, qwen2, gpt_neox)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    """Extra RoPE parameters (factor, low_freq_factor, ...) as sorted (key, value) pairs."""
    partial_rotary_factor: float = 1.0
    # gpt2
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # gpt_neox
    use_parallel_residual: bool = True
    # special tokens (informational)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = field(default=None, hash=False)
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        check_model_type(self.model_type)
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r} is invalid: allowed {', '.join(DTYPES)}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("ModelConfig.dtype='float64' needs 64-bit JAX: run inside "
                             "jax.enable_x64(True) or set jax_enable_x64")
        if not isinstance(self.options, ModelOptions):
            raise TypeError(f"ModelConfig.options must be a ModelOptions, got {type(self.options).__name__}")
        from ppo_jax.models.lora import check_options
        check_options(self.model_type, self.options)  # LoRA targets this architecture has
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @property
    def compute_dtype(self) -> str | None:
        """The matmuls' dtype (`options.compute_dtype`); None = `dtype`."""
        return self.options.compute_dtype

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that RoPE rotates (HF: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, dtype: str = "float32",
                options: ModelOptions | None = None) -> "ModelConfig":
        """Build from a parsed HF config.json (and the options the model is built with; default
        `ModelOptions()`). ValueError for an unsupported model_type or for
        features our models do not implement (sliding-window attention, other RoPE types)."""
        mt = check_model_type(hf.get("model_type"))
        common = dict(model_type=mt, vocab_size=int(hf["vocab_size"]), dtype=dtype,
                      options=ModelOptions() if options is None else options,
                      pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
                      eos_token_id=hf.get("eos_token_id"), hf_config=dict(hf))
        if mt == "gpt2":
            h, nh = int(hf["n_embd"]), int(hf["n_head"])
            return cls(hidden_size=h, num_layers=int(hf["n_layer"]), num_heads=nh, num_kv_heads=nh,
                       head_dim=h // nh, intermediate_size=int(hf.get("n_inner") or 4 * h),
                       max_position_embeddings=int(hf["n_positions"]),
                       norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                       hidden_act=hf.get("activation_function", "gelu_new"),
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                       qkv_bias=True, o_bias=True, mlp_bias=True,
                       scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
                       scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                       **common)

        h, nh = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{mt}: rope_type {rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        theta = rope.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        partial = rope.pop("partial_rotary_factor",
                           hf.get("partial_rotary_factor",
                                  hf.get("rotary_pct", 0.25 if mt == "gpt_neox" else 1.0)))
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        rope_kw = dict(rope_theta=float(theta), rope_type=rope_type,
                       rope_scaling=tuple(sorted(rope.items())), partial_rotary_factor=float(partial))

        if mt == "gpt_neox":
            return cls(hidden_size=h, num_layers=int(hf["num_hidden_layers"]), num_heads=nh,
                       num_kv_heads=nh, head_dim=h // nh,
                       intermediate_size=int(hf.get("intermediate_size") or 4 * h),
                       max_position_embeddings=int(hf["max_position_embeddings"]),
                       norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                       hidden_act=hf.get("hidden_act", "gelu"),
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       qkv_bias=bool(hf.get("attention_bias", True)),
                       o_bias=bool(hf.get("attention_bias", True)), mlp_bias=True,
                       use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
                       **rope_kw, **common)

        # llama / qwen2
        if hf.get("use_sliding_window"):
            raise ValueError(f"{mt}: sliding-window attention (use_sliding_window=true) is not "
                             f"supported")
        if mt == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        return cls(hidden_size=h, num_layers=int(hf["num_hidden_layers"]), num_heads=nh,
                   num_kv_heads=int(hf.get("num_key_value_heads") or nh),
                   head_dim=int(hf.get("head_dim") or h // nh),
                   intermediate_size=int(hf["intermediate_size"]),
                   max_position_embeddings=int(hf["max_position_embeddings"]),
                   norm_eps=float(hf.get("rms_norm_eps", 1e-6)), hidden_act=hf.get("hidden_act", "silu"),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, **rope_kw, **common)
