"""`CausalLM`: a thin wrapper of a Hugging Face causal LM. Mirror: `ppo_jax/models/causal_lm.py`.

    logits = model(input_ids, attention_mask=mask)           # [B, T] -> [B, T, V] float32

`mask` [B, T] is 1 on real tokens (default: all ones); positions come from the mask,
cumsum(mask) - 1 clipped at 0, so left-padded prompts start at position 0 (HF's default
positions, 0..T-1, ignore padding); pass `positions` to override. The LM head runs in float32 on
the backbone's hidden states (bfloat16 models: bf16 activations, float32 logits -- the same
arithmetic as the JAX core, where HF would round the logits to bf16). How it runs is fixed
when it is built (`CausalLM(hf_model, options=ModelOptions(...))`, `load_pretrained(...,
options=)`): mixed precision (`compute_dtype`, `precision.py`: float32 weights, the backbone
under `torch.autocast`, the LM head on bf16-rounded inputs with float32 logits) and activation
checkpointing (`remat`, `remat.py`).

KV cache (generation) uses HF's own `Cache` (a `DynamicCache` that grows):

    logits, cache = model(prompt_ids, attention_mask=prompt_mask, use_cache=True)
    logits, cache = model(next_ids [B, 1], attention_mask=mask_so_far [B, P + t + 1], cache=cache)

With a cache, `attention_mask` covers the cached tokens AND the new ones, and default positions
are cumsum(attention_mask) - 1 clipped at 0, read at the last S entries. This differs from the
JAX cache (static max_len slots + cache_index), which jit needs; both equal the full forward.

`model.hf_model` is the wrapped `transformers` model (for saving, HF generation, inspection);
`model.config` is its HF config. Dropout is disabled at load (as TRL does for PPO; the JAX
models have none).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ppo_rlhf.config import ModelOptions
from ppo_torch.models.lora import apply_lora
from ppo_torch.models.remat import checkpoint_layers

Tensor = torch.Tensor


def default_positions(attention_mask: Tensor, length: int) -> Tensor:
    """cumsum(mask) - 1 clipped at 0, for the last `length` positions of the mask: [B, length]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def autocast(device: torch.device, compute_dtype: torch.dtype | None):
    """`torch.autocast` to compute_dtype on `device` (mixed precision), or nothing for None /
    float32 (float32 weights compute in float32 anyway)."""
    if compute_dtype is None or compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def project(hidden: Tensor, weight: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
    """hidden [..., H] @ weight[N, H].T in float32 (bf16 inputs are upcast, which is exact;
    float64 stays float64), never under autocast. With a compute dtype (mixed precision, the LM
    head) both inputs are first rounded to it: the arithmetic of a bf16 matmul accumulating and
    returning float32 (products of two bf16 numbers are exact in float32), as JAX's
    `preferred_element_type=float32` -- autocast would round the logits to bf16."""
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.to(dtype), weight.to(dtype))


def backbone_hidden(hf_model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    positions: Tensor | None, cache=None, use_cache: bool = False,
                    compute_dtype: torch.dtype | None = None):
    """(final-norm hidden states [B, S, H], cache or None) of an HF model's backbone, under
    `torch.autocast(compute_dtype)` when one is given (mixed precision)."""
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        attention_mask = torch.ones((input_ids.shape[0], past + input_ids.shape[1]),
                                    dtype=torch.long, device=input_ids.device)
    if positions is None:
        positions = default_positions(attention_mask, input_ids.shape[1])
    use_cache = use_cache or cache is not None
    with autocast(input_ids.device, compute_dtype):
        out = hf_model.base_model(input_ids=input_ids.long(), attention_mask=attention_mask.long(),
                                  position_ids=positions.long(), cache=cache, use_cache=use_cache)
    return out.last_hidden_state, (out.cache if use_cache else None)


def token_stats(head, hidden: Tensor, labels: Tensor, temperature: float, chunk: int,
                return_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """(log softmax(head(hidden) / temperature)[labels], its entropy or None), each [B, R]
    float32, from hidden [B, R, H] and labels [B, R]; `head(h)` -> float32 logits.

    chunk > 0: `chunk` positions at a time, each chunk under `torch.utils.checkpoint`
    (use_reentrant=False) when autograd records: the forward keeps only each chunk's [B, chunk]
    results and the backward recomputes one chunk's [B, chunk, V] float32 logits at a time, so
    no [B, R, V] tensor is live (without autograd, only one chunk's logits exist at a time).
    Mirror: `ppo_jax.models.forward._chunk_stats`."""
    from torch.utils.checkpoint import checkpoint

    from ppo_torch.losses import logprobs_from_logits, token_entropy

    def one(h: Tensor, lab: Tensor) -> tuple[Tensor, ...]:
        logits = head(h)
        lp = logprobs_from_logits(logits, lab, temperature)
        return (lp, token_entropy(logits, temperature)) if return_entropy else (lp,)

    if not chunk:
        out = one(hidden, labels)
    else:
        grad = torch.is_grad_enabled()
        parts = [checkpoint(one, hidden[:, s:s + chunk], labels[:, s:s + chunk], use_reentrant=False)
                 if grad else one(hidden[:, s:s + chunk], labels[:, s:s + chunk])
                 for s in range(0, hidden.shape[1], chunk)]
        out = tuple(torch.cat(o, dim=1) for o in zip(*parts))
    return out[0], (out[1] if return_entropy else None)


def build_with(model: nn.Module, options: ModelOptions | None) -> None:
    """A model being built (`CausalLM`, `ScalarHeadModel`, or a fresh copy of one:
    `precision.rebuild`) takes its options: `model.options`, the autocast dtype
    `model.compute_dtype` and the checkpointing of `model.hf_model`'s decoder layers.
    (`scan_unroll` is JAX's: these layers are a Python loop already.)"""
    model.options = ModelOptions() if options is None else options
    cd = model.options.compute_dtype
    model.compute_dtype = None if cd is None else getattr(torch, cd)
    apply_lora(model.hf_model, model.options)  # LoRA adapters (lora.py), the rest frozen
    store_base(model.hf_model, model.options.base_dtype)
    checkpoint_layers(model.hf_model, model.options.remat)


class _Float32Embedding(nn.Embedding):
    """An embedding stored in a low dtype that returns float32 rows (`store_base`)."""

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        return out.to(torch.promote_types(out.dtype, torch.float32))


class _Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm stored in a low dtype that normalises and scales in its input's float32
    (`store_base`; torch's CPU kernel refuses a float32 input with bfloat16 parameters)."""

    def forward(self, input: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(input.dtype)
        b = None if self.bias is None else self.bias.to(input.dtype)
        return F.layer_norm(input, self.normalized_shape, w, b, self.eps)


def store_base(hf_model: nn.Module, dtype: str | None) -> None:
    """A LoRA model's frozen base weights (every parameter with requires_grad False: all but the
    adapters and a score head, `lora.apply_lora`) stored in `dtype` (`ModelOptions.base_dtype`;
    None: nothing to do), in place. The forward stays the mixed-precision one (`dtype` is the
    compute dtype: autocast casts the matmuls' weights to it anyway): the embeddings return
    float32 rows and the LayerNorms scale in float32, so the residual stream, the norms and the
    logits stay float32 (Llama's RMSNorm promotes by itself). Mirror: JAX's
    `precision.store_base`."""
    if dtype is None:
        return
    dt = getattr(torch, dtype)
    for p in hf_model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dt:
            p.data = p.data.to(dt)
    for m in hf_model.modules():
        if type(m) is nn.Embedding:
            m.__class__ = _Float32Embedding
        elif type(m) is nn.LayerNorm:
            m.__class__ = _Float32LayerNorm


class CausalLM(nn.Module):
    """A `transformers` causal LM returning float32 logits, positions from the mask."""

    def __init__(self, hf_model: nn.Module, *, options: ModelOptions | None = None):
        super().__init__()
        self.hf_model = hf_model
        build_with(self, options)

    @property
    def config(self):
        return self.hf_model.config

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                      positions: Tensor | None = None, cache=None, use_cache: bool = False):
        """(final-norm hidden states [B, S, H] in the model dtype, cache or None)."""
        return backbone_hidden(self.hf_model, input_ids, attention_mask, positions, cache, use_cache,
                               self.compute_dtype)

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """LM head in float32: [..., H] -> [..., V]."""
        return project(hidden, self.hf_model.get_output_embeddings().weight, self.compute_dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                positions: Tensor | None = None, cache=None, use_cache: bool = False,
                logits_to_keep: int = 0, labels: Tensor | None = None, temperature: float = 1.0,
                chunk: int = 0, return_entropy: bool = False):
        """Logits [B, S, V] float32 (the last `logits_to_keep` positions if > 0); with
        use_cache=True or a cache, (logits, cache). See the module docstring.

        labels [B, R] (the last R tokens of input_ids): instead, (log-probs, entropy or None)
        of those tokens, [B, R] float32, under logits / temperature, computed by `token_stats`
        (`chunk` positions at a time if > 0). Inside forward, so DDP / FSDP see the LM head."""
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions,
                                               cache=cache, use_cache=use_cache)
        if labels is not None:
            R = labels.shape[1]
            return token_stats(self.logits_from_hidden, hidden[:, -R - 1:-1], labels, temperature,
                               chunk, return_entropy)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits_from_hidden(hidden)
        return (logits, new_cache) if (use_cache or cache is not None) else logits
