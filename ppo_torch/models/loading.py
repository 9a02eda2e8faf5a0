"""Hugging Face checkpoints <-> PyTorch models (via `transformers`). Mirror: `ppo_jax/models/loading.py`.

The same checkpoint dirs as the JAX core (`ppo_rlhf.hf_checkpoint`): the file / model_type
checks are shared, so both backends fail the same way (FileNotFoundError for a missing dir,
config.json or weights; ValueError listing the supported model types). Models are loaded with
`AutoModelForCausalLM` / `AutoModelForSequenceClassification` from the local dir only, put in
eval mode, with dropout disabled (the JAX models have none). Loading is strict, as in JAX: a
tensor missing from the checkpoint or of the wrong shape is a CheckpointError (transformers alone
would initialise it at random). transformers' progress bars and load report are kept off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ml_dtypes
import numpy as np
import torch
from torch import nn

from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError
from ppo_torch.models.causal_lm import CausalLM
from ppo_torch.models.heads import PolicyWithValueHead, ScalarHeadModel

PathLike = str | os.PathLike
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def torch_dtype(dtype: Any) -> torch.dtype:
    """torch.float32 / torch.bfloat16 / torch.float64 from a name, a torch dtype or None
    (= float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is not supported: allowed {', '.join(DTYPES)}")


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of an HF model to 0 (nn.Dropout modules and the
    `attention_dropout` floats attention modules pass to their kernels)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") and its load
    report off inside the block -- on every load and save they clutter CLI output, and the
    problems the report lists are raised as errors here (`_from_pretrained`) -- restored after."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(auto_cls: Any, path: PathLike, *, fresh: tuple[str, ...] = (),
                     unused: tuple[str, ...] = (), **kw: Any) -> Any:
    """`auto_cls.from_pretrained(path)` from the local dir only, strict like the JAX loader: a
    tensor the model needs but the checkpoint lacks (transformers would initialise it at random;
    except the names in `fresh`), one whose shape differs from the config's, or one the model
    does not use (transformers would drop it: an unsupported variant; except buffers and the
    names in `unused`) is a CheckpointError naming it."""
    with quiet_transformers():
        hf_model, info = auto_cls.from_pretrained(str(path), local_files_only=True,
                                                  output_loading_info=True,
                                                  ignore_mismatched_sizes=True, **kw)
    model_type = hf_model.config.model_type
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, stored, expected = mismatched[0]
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(stored)}, the model "
                              f"expects {tuple(expected)}")
    missing = sorted(set(info.get("missing_keys") or ()) - set(fresh))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} for a {model_type} model")
    surplus = sorted(k for k in set(info.get("unexpected_keys") or ()) - set(unused)
                     if not k.endswith(hfc.IGNORED_SUFFIXES))
    if surplus:
        raise CheckpointError(f"{path}: checkpoint tensor(s) {surplus[:8]}{' ...' if len(surplus) > 8 else ''}"
                              f" are not used by the {model_type} model (unsupported variant?)")
    return hf_model


def _check_kind(path: PathLike, *, scalar: bool) -> dict:
    """Neutral checks before handing the dir to transformers; returns the config dict."""
    hf = hfc.read_config(path)
    names = set(hfc.weight_names(path))
    lm_head = f"{hfc.LM_HEAD_NAME[hf['model_type']]}.weight"
    if scalar and hfc.SCORE_NAME not in names:
        raise CheckpointError(f"{path}: no {hfc.SCORE_NAME} in the checkpoint: it is not a scalar-head "
                         f"model; to start one from a causal LM use scalar_model_from_lm")
    if not scalar and hfc.SCORE_NAME in names and lm_head not in names:
        raise CheckpointError(f"{path}: this is a scalar-head (value / reward) checkpoint (it has "
                         f"{hfc.SCORE_NAME}, no {lm_head}); load it with load_scalar_model")
    return hf


def model_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """A model's weights under their on-disk HF names as numpy (bfloat16 as ml_dtypes.bfloat16)
    -- what `save_pretrained` writes: a tied LM head is left out, and the untied one takes its
    checkpoint name (transformers 5 calls GPT-NeoX's `embed_out` `lm_head` in memory and converts
    it back on save). A PolicyWithValueHead gives its LM's tensors."""
    if isinstance(model, PolicyWithValueHead):
        model = model.lm
    hf_model = model.hf_model
    tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
    lm_head = f"{hfc.LM_HEAD_NAME[hf_model.config.model_type]}.weight"
    out = {}
    for name, t in hf_model.state_dict().items():
        if name.endswith(hfc.IGNORED_SUFFIXES) or ".lora_" in name:  # the base weights only
            continue
        name = name.replace(".base_layer.", ".")  # a projection with a LoRA adapter (lora.py)
        if isinstance(model, CausalLM) and name in ("lm_head.weight", lm_head):
            if tied:
                continue
            name = lm_head
        t = t.detach().cpu()
        out[name] = (t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                     else t.numpy().copy())
    return out


# ---- public API ----------------------------------------------------------------------------------
def load_pretrained(path: PathLike, dtype: Any = "float32", *, options: ModelOptions | None = None,
                    with_value_head: bool = False, seed: int = 0,
                    attn_implementation: str | None = None) -> CausalLM | PolicyWithValueHead:
    """A causal LM from a Hugging Face checkpoint dir (gpt2, llama, qwen2, gpt_neox).

    dtype: "float32" (default) or "bfloat16" for weights and activations (logits stay float32);
    "float64" for numerics checks (everything in float64).
    options: how the model runs (`ppo_rlhf.config.ModelOptions`: remat, compute_dtype;
    scan_unroll is JAX's; default `ModelOptions()`), fixed from now on.
    with_value_head=True returns a `PolicyWithValueHead` (shared trunk): its value head is read
    from <path>/value_head.safetensors when present, else drawn fresh from `seed`
    (`ppo_rlhf.hf_checkpoint.init_score_head`, identical in both backends).
    attn_implementation: passed to transformers (None = its default, "sdpa").
    A PEFT adapter dir (`save_adapter`, `PPOTrainer.save_policy`, `ppo-rlhf pretrain --lora-rank`)
    loads as its base (adapter_config.json's base_model_name_or_path) + the adapter: with
    options None built with the adapter's LoRA options, the adapters kept; with LoRA options,
    those (they must be the adapter's); with options without LoRA, merged into the base
    (`merge_adapters`): a plain model with those options.
    Errors: FileNotFoundError (no dir / config.json / weights), ValueError (unsupported
    model_type, a scalar-head checkpoint)."""
    from transformers import AutoModelForCausalLM

    base = lr.adapter_base(path)
    if base is not None:  # a PEFT adapter dir: base + adapter
        from ppo_torch.models.lora import load_adapter, merge_adapters

        if lr.is_scalar_adapter(path):
            raise CheckpointError(f"{path}: a scalar-head (value / reward) model's adapter; load it with "
                                  f"load_scalar_model")
        merged = lr.merged_load(options)
        built = lr.adapter_options(path, base, options) if merged else lr.adapter_dir_options(path, base, options)
        model = load_adapter(load_pretrained(base, dtype, options=built, with_value_head=with_value_head,
                                             seed=seed, attn_implementation=attn_implementation), path)
        return merge_adapters(model).eval() if merged else model
    _check_kind(path, scalar=False)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    hf_model = _from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype(dtype), **kw)
    lm = CausalLM(disable_dropout(hf_model), options=options).eval()
    if not with_value_head:
        return lm
    head = hfc.load_value_head(path)
    hidden = hf_model.get_output_embeddings().weight.shape[1]
    return PolicyWithValueHead(lm, hfc.init_score_head(hidden, seed) if head is None else head).eval()


def load_scalar_model(path: PathLike, dtype: Any = "float32", *, options: ModelOptions | None = None,
                      attn_implementation: str | None = None) -> ScalarHeadModel:
    """A value / reward model from a `*ForSequenceClassification` (num_labels=1) checkpoint dir;
    reward_gain / reward_bias are read from config.json's "ppo_rlhf" key (default 1, 0);
    `options` as `load_pretrained`.
    A reward model's PEFT adapter dir (SEQ_CLS: `save_adapter`, `ppo-rlhf train-rm --lora-rank`)
    loads as its base (a causal LM, or a scalar-head checkpoint) + the adapter, its score head
    and its reward gain / bias (`ppo_rlhf.lora.REWARD_NORMALISATION`): with options None or
    without LoRA merged into the base (`merge_adapters`: a plain model -- how PPO, eval and the
    demo use a reward model); with LoRA options, those (the adapter's rank and scale), the
    adapters kept."""
    from transformers import AutoModelForSequenceClassification

    base = lr.adapter_base(path)
    if base is not None:
        return _load_scalar_adapter(path, base, dtype, options=options, attn_implementation=attn_implementation)
    hf = _check_kind(path, scalar=True)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    hf_model = _from_pretrained(AutoModelForSequenceClassification, path,
                                dtype=torch_dtype(dtype), **kw)
    if tuple(hf_model.score.weight.shape) != (1, hf_model.config.hidden_size):
        raise CheckpointError(f"{path}: {hfc.SCORE_NAME} has shape {tuple(hf_model.score.weight.shape)}; "
                         f"a scalar head needs num_labels=1")
    gain, bias = hfc.reward_normalisation(hf)
    return ScalarHeadModel(disable_dropout(hf_model), reward_gain=gain, reward_bias=bias,
                           options=options).eval()


def _load_scalar_adapter(path: PathLike, base: Path, dtype: Any, *, options: ModelOptions | None,
                         attn_implementation: str | None) -> ScalarHeadModel:
    """`load_scalar_model(<a SEQ_CLS adapter dir>)` (see there)."""
    from ppo_torch.models.lora import load_adapter, merge_adapters

    if not lr.is_scalar_adapter(path):
        raise CheckpointError(f"{path}: a causal LM's adapter, not a scalar-head model's (task_type SEQ_CLS); "
                              f"load it with load_pretrained")
    _, tensors = lr.read_adapter(path)
    if lr.HEAD_TENSOR not in tensors:
        raise CheckpointError(f"{path}: the adapter holds no score head ({lr.HEAD_TENSOR}, modules_to_save)")
    merged = options is None or not options.lora
    built = lr.adapter_options(path, base, options) if merged else lr.adapter_dir_options(path, base, options)
    if hfc.is_scalar_checkpoint(base):
        model = load_scalar_model(base, dtype, options=built, attn_implementation=attn_implementation)
    else:  # a causal LM: its trunk (the head comes from the adapter)
        model = scalar_model_from_lm(base, dtype=dtype, options=built)
    model = load_adapter(model, path)
    model = merge_adapters(model).eval() if merged else model
    model.reward_gain, model.reward_bias = lr.read_reward_normalisation(path)
    return model


def scalar_model_from_lm(lm: PathLike | CausalLM | PolicyWithValueHead, *, seed: int = 0,
                         dtype: Any = None, options: ModelOptions | None = None,
                         reward_gain: float = 1.0, reward_bias: float = 0.0) -> ScalarHeadModel:
    """A value / reward model whose backbone is a copy of the causal LM `lm` (a checkpoint dir or
    a loaded model) and whose score head is fresh: `init_score_head(hidden_size, seed)`, drawn
    with numpy, so both backends build the same model from the same seed. dtype None keeps the
    LM's dtype (float32 for a path); options None the LM's options (`ModelOptions()` for a path)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if isinstance(lm, PolicyWithValueHead):
        lm = lm.lm
    if isinstance(lm, CausalLM) and options is None:
        options = lm.options
    if isinstance(lm, CausalLM):
        src = lm.hf_model
        config = AutoConfig.for_model(**src.config.to_dict())
        config.num_labels = 1
        dt = src.get_output_embeddings().weight.dtype if dtype is None else torch_dtype(dtype)
        hf_model = AutoModelForSequenceClassification.from_config(config).to(
            device=src.device, dtype=dt)
        base = {k.replace(".base_layer.", "."): v for k, v in src.base_model.state_dict().items()
                if ".lora_" not in k}  # a LoRA model's base weights (lora.py), not its adapters
        hf_model.base_model.load_state_dict(base)
    else:
        _check_kind(lm, scalar=False)
        # score.weight is missing from a causal LM (the head is drawn just below) and its LM
        # head is unused: both expected here
        hf = hfc.read_config(lm)
        hf_model = _from_pretrained(AutoModelForSequenceClassification, lm, fresh=(hfc.SCORE_NAME,),
                                    unused=(f"{hfc.LM_HEAD_NAME[hf['model_type']]}.weight",),
                                    num_labels=1, dtype=torch_dtype(dtype))
    with torch.no_grad():
        w = hfc.init_score_head(hf_model.config.hidden_size, seed)
        hf_model.score.weight.copy_(torch.from_numpy(w))
    return ScalarHeadModel(disable_dropout(hf_model), reward_gain=reward_gain,
                           reward_bias=reward_bias, options=options).eval()


def save_pretrained(model: CausalLM | ScalarHeadModel | PolicyWithValueHead, path: PathLike, *,
                    max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint dir (transformers' `save_pretrained`:
    config.json + safetensors, sharded with an index above `max_shard_bytes`). A ScalarHeadModel
    also records its reward gain/bias under "ppo_rlhf" in config.json; a PolicyWithValueHead
    also writes value_head.safetensors (float32). Returns the path."""
    path = Path(path)
    lm = model.lm if isinstance(model, PolicyWithValueHead) else model
    hf_model = lm.hf_model
    if isinstance(model, ScalarHeadModel):
        setattr(hf_model.config, hfc.PPO_RLHF_KEY,
                {"reward_gain": model.reward_gain, "reward_bias": model.reward_bias})
    kw = {} if max_shard_bytes is None else {"max_shard_size": int(max_shard_bytes)}
    path.mkdir(parents=True, exist_ok=True)
    hfc.remove_weight_files(path)  # transformers leaves an earlier save's shards and index behind
    with quiet_transformers():
        hf_model.save_pretrained(str(path), **kw)
    if isinstance(model, PolicyWithValueHead):
        hfc.save_value_head(path, model.value_head.weight.detach().float().cpu().numpy())
    return path
