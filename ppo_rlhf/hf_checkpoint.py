"""Hugging Face checkpoint directories, backend-neutral (numpy + safetensors only).

Both cores read and write the same on-disk format, the one `transformers` uses:

  <dir>/config.json                     model_type, sizes, ... (+ our "ppo_rlhf" key, see below)
  <dir>/model.safetensors               all weights in one file, or
  <dir>/model.safetensors.index.json    {"weight_map": {name: shard file}} + the shard files

Two kinds of checkpoint:

* a causal LM  (`GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `GPTNeoXForCausalLM`):
  `<backbone>.*` (+ `lm_head.weight` / `embed_out.weight` unless the embeddings are tied);
* a scalar-head model, used for BOTH the value model and the reward model: a standard
  `*ForSequenceClassification` with `num_labels=1`: `<backbone>.*` + `score.weight` [1, H], no bias
  (as TRL does). Its `config.json` may carry the reward normalisation set by reward-model training:
  `"ppo_rlhf": {"reward_gain": g, "reward_bias": b}` -> score = g * head(h_last) + b.

Where <backbone> is `transformer` (gpt2), `model` (llama, qwen2) or `gpt_neox` (gpt_neox).

This module finds, reads and writes those files and initialises score heads (in numpy, so that the
same seed gives the same head in both backends). It imports neither jax nor torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ppo_rlhf.errors import CheckpointError, CheckpointNotFoundError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "gpt_neox")
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
VALUE_HEAD_NAME = "value_head.safetensors"
"""Extra file next to a causal-LM checkpoint holding the value head of a shared-trunk policy
(`score.weight` [1, H]); `transformers` ignores it."""
PPO_RLHF_KEY = "ppo_rlhf"

# Per architecture: prefix of the backbone weights, name of the untied LM head, HF class names.
BACKBONE_PREFIX = {"gpt2": "transformer", "llama": "model", "qwen2": "model", "gpt_neox": "gpt_neox"}
LM_HEAD_NAME = {"gpt2": "lm_head", "llama": "lm_head", "qwen2": "lm_head", "gpt_neox": "embed_out"}
CAUSAL_LM_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
SCALAR_ARCH = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
               "qwen2": "Qwen2ForSequenceClassification",
               "gpt_neox": "GPTNeoXForSequenceClassification"}
SCORE_NAME = "score.weight"

# Buffers that some (older) checkpoints store and no model needs.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                    ".rotary_emb.inv_freq")


# ---- config ------------------------------------------------------------------------------------
def check_model_type(model_type: Any, where: str = "config.json") -> str:
    """`model_type` if supported, else ValueError listing the supported ones."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"unsupported model_type {model_type!r} (from {where}); supported model "
                         f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` as a Path, or FileNotFoundError if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {str(p)!r} does not exist (expected a Hugging "
                                f"Face model directory with {CONFIG_NAME} and {SAFE_WEIGHTS_NAME} or "
                                f"{SAFE_WEIGHTS_INDEX_NAME})")
    return p


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint dir (model_type checked)."""
    p = checkpoint_dir(path) / CONFIG_NAME
    if not p.is_file():
        raise CheckpointNotFoundError(f"{str(p)!r} not found: a Hugging Face checkpoint directory needs a "
                                f"{CONFIG_NAME} (with a model_type among {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        config = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(p)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(p)!r} must hold a JSON object")
    check_model_type(config.get("model_type"), str(p))
    return config


def reward_normalisation(config: Mapping[str, Any]) -> tuple[float, float]:
    """(reward_gain, reward_bias) from a config dict; (1.0, 0.0) when absent."""
    meta = config.get(PPO_RLHF_KEY) or {}
    return float(meta.get("reward_gain", 1.0)), float(meta.get("reward_bias", 0.0))


def scalar_config(lm_config: Mapping[str, Any], *, reward_gain: float = 1.0,
                  reward_bias: float = 0.0) -> dict[str, Any]:
    """The config.json of a scalar-head (`*ForSequenceClassification`, num_labels=1) model with the
    backbone of `lm_config`."""
    config = dict(lm_config)
    config["architectures"] = [SCALAR_ARCH[check_model_type(config.get("model_type"))]]
    config["id2label"] = {"0": "LABEL_0"}
    config["label2id"] = {"LABEL_0": 0}
    config[PPO_RLHF_KEY] = {"reward_gain": float(reward_gain), "reward_bias": float(reward_bias)}
    return config


def write_config(path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- weights -----------------------------------------------------------------------------------
def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by model.safetensors.index.json,
    or model.safetensors. FileNotFoundError naming what was expected otherwise."""
    d = checkpoint_dir(path)
    index = d / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{str(index)!r} is unreadable or not a valid shard index: {e}") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{str(index)!r} names shard(s) that do not exist: {missing}")
        return files
    single = d / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".msgpack", ".h5"))
    hint = f" (found {other}: only safetensors weights are supported)" if other else ""
    raise CheckpointNotFoundError(f"no weights in {str(d)!r}: expected {SAFE_WEIGHTS_NAME} or "
                            f"{SAFE_WEIGHTS_INDEX_NAME} with its shards{hint}")


def weight_names(path: str | os.PathLike) -> list[str]:
    """Names of all tensors of a checkpoint, read from the headers only."""
    names: list[str] = []
    for f in weight_files(path):
        with _open_safetensors(f) as fh:
            names.extend(fh.keys())
    return names


def _open_safetensors(f: Path) -> Any:
    """safe_open(f), or CheckpointError naming the file when it cannot be read or is not a valid
    safetensors file (truncated, overwritten, a half-finished download)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="numpy")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{str(f)!r} is unreadable or not a valid safetensors file ({e}); "
                              f"the checkpoint is damaged: save or download it again") from None


def is_scalar_checkpoint(path: str | os.PathLike) -> bool:
    """True if the checkpoint has a `score.weight` (a value / reward model)."""
    return SCORE_NAME in weight_names(path)


def load_tensors(path: str | os.PathLike, *,
                 names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All tensors (or only `names`) of a checkpoint as numpy arrays in their stored dtype
    (bfloat16 as `ml_dtypes.bfloat16`). Sharded checkpoints are read shard by shard."""
    wanted = None if names is None else set(names)
    out: dict[str, np.ndarray] = {}
    for f in weight_files(path):
        with _open_safetensors(f) as fh:
            for k in fh.keys():
                if wanted is None or k in wanted:
                    out[k] = fh.get_tensor(k)
    return out


class TensorSlices:
    """The tensors of a checkpoint (`tensors`: a dict of numpy arrays, or a checkpoint dir whose
    safetensors files are opened -- headers only -- and read lazily), each readable a slice at a
    time: `read(name, index)` returns `tensor[index]` (`index` a tuple of slices), and from a
    file only those bytes are read (safetensors `get_slice`), so a loader that places each
    device's shard never holds a whole tensor. Each read maps the file anew and unmaps it after:
    pages of a memory-mapped file count in the process's resident set while it stays mapped, so
    a file kept open would end up resident whole. Use as a context manager (closes the files)."""

    def __init__(self, tensors: str | os.PathLike | Mapping[str, np.ndarray]):
        self._arrays: Mapping[str, np.ndarray] | None = None
        self._where: dict[str, tuple[Path, tuple[int, ...]]] = {}
        if isinstance(tensors, Mapping):
            self._arrays = tensors
            return
        for f in weight_files(tensors):  # the headers: names and shapes (no tensor data read)
            with _open_safetensors(f) as fh:
                for k in fh.keys():
                    self._where[k] = (f, tuple(fh.get_slice(k).get_shape()))

    def keys(self) -> list[str]:
        return list(self._arrays if self._arrays is not None else self._where)

    def __contains__(self, name: str) -> bool:
        return name in (self._arrays if self._arrays is not None else self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._arrays is not None:
            return tuple(np.shape(self._arrays[name]))
        return self._where[name][1]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`tensor[index]` as numpy, in the stored dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if self._arrays is not None:
            return np.asarray(self._arrays[name])[index]
        f, shape = self._where[name]
        with _open_safetensors(f) as fh:
            if not shape:  # a 0-d tensor: nothing to slice
                return np.asarray(fh.get_tensor(name))
            return np.asarray(fh.get_slice(name)[index])

    def close(self) -> None:
        self._where = {}

    def __enter__(self) -> "TensorSlices":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def remove_weight_files(path: str | os.PathLike) -> None:
    """Delete the weight files (model*.safetensors and the shard index) of an earlier save in
    `path`: a save that writes fewer or differently named files must not leave a stale index
    naming shards, or shards beside a single file."""
    d = Path(path)
    for old in list(d.glob("model*.safetensors")) + [d / SAFE_WEIGHTS_INDEX_NAME]:
        if old.exists():
            old.unlink()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                 max_shard_bytes: int | None = None) -> list[Path]:
    """Write `tensors` as model.safetensors, or, if they exceed `max_shard_bytes`, as
    model-0000i-of-0000n.safetensors shards + model.safetensors.index.json (the layout
    `transformers` writes). Stale weight files of an earlier save in `path` are removed."""
    from safetensors.numpy import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    remove_weight_files(d)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].nbytes
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(d / SAFE_WEIGHTS_NAME), metadata=meta)
        return [d / SAFE_WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata=meta)
        files.append(d / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": weight_map}
    (d / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


# ---- heads -------------------------------------------------------------------------------------
def init_score_head(hidden_size: int, seed: int) -> np.ndarray:
    """A fresh scalar head, float32 [1, hidden_size] (HF `score.weight` layout), drawn with numpy
    so that both backends get the same weights from the same seed:
    N(0, 1 / (hidden_size + 1)), the reward-head init of Ziegler et al. (lm-human-preferences),
    which makes the initial output O(1) on unit-scale (layer-normed) hidden states."""
    rng = np.random.default_rng(seed)
    std = 1.0 / math.sqrt(hidden_size + 1)
    return (rng.standard_normal((1, hidden_size)) * std).astype(np.float32)


def save_value_head(path: str | os.PathLike, weight: np.ndarray) -> None:
    """The value head of a shared-trunk policy, [1, H], as <path>/value_head.safetensors."""
    from safetensors.numpy import save_file

    Path(path).mkdir(parents=True, exist_ok=True)
    save_file({SCORE_NAME: np.ascontiguousarray(weight)}, str(Path(path) / VALUE_HEAD_NAME),
              metadata={"format": "pt"})


def load_value_head(path: str | os.PathLike) -> np.ndarray | None:
    """<path>/value_head.safetensors's `score.weight`, or None when the file does not exist."""
    from safetensors.numpy import load_file

    f = Path(path) / VALUE_HEAD_NAME
    return load_file(str(f))[SCORE_NAME] if f.is_file() else None


# ---- a fresh GPT-2 -------------------------------------------------------------------------------
def init_gpt2_tensors(hf_config: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """GPT-2 weights under their Hugging Face names, drawn with numpy (so both backends start
    from the same model): GPT-2's init -- N(0, initializer_range) for embeddings and projections,
    N(0, initializer_range / sqrt(2 * n_layer)) for the residual output projections (attn.c_proj,
    mlp.c_proj), zero biases, unit LayerNorms. Embeddings tied to the LM head."""
    c = dict(hf_config)
    if c.get("model_type") != "gpt2":
        raise ValueError(f"init_gpt2_tensors: model_type must be 'gpt2', got {c.get('model_type')!r}")
    if not c.get("tie_word_embeddings", True):
        raise ValueError("init_gpt2_tensors: only tied embeddings are supported")
    rng = np.random.default_rng(seed)
    V, P, H, L = int(c["vocab_size"]), int(c["n_positions"]), int(c["n_embd"]), int(c["n_layer"])
    inner = int(c.get("n_inner") or 4 * H)
    std = float(c.get("initializer_range", 0.02))
    proj_std = std / math.sqrt(2 * L)

    def normal(shape, s):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    t = {"transformer.wte.weight": normal((V, H), std), "transformer.wpe.weight": normal((P, H), std)}
    for i in range(L):
        p = f"transformer.h.{i}."
        t[p + "ln_1.weight"], t[p + "ln_1.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
        t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"] = normal((H, 3 * H), std), np.zeros(3 * H, np.float32)
        t[p + "attn.c_proj.weight"], t[p + "attn.c_proj.bias"] = normal((H, H), proj_std), np.zeros(H, np.float32)
        t[p + "ln_2.weight"], t[p + "ln_2.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
        t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = normal((H, inner), std), np.zeros(inner, np.float32)
        t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = normal((inner, H), proj_std), np.zeros(H, np.float32)
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = np.ones(H, np.float32), np.zeros(H, np.float32)
    return t


def write_fresh_checkpoint(path: str | os.PathLike, hf_config: Mapping[str, Any], *, seed: int = 0,
                           tokenizer: Any = None) -> Path:
    """A freshly initialised GPT-2 (`init_gpt2_tensors`) as a Hugging Face checkpoint dir (+ the
    tokenizer, a `transformers` tokenizer, when given): loads in both backends and transformers."""
    path = Path(path)
    config = {**dict(hf_config), "architectures": [CAUSAL_LM_ARCH["gpt2"]], "dtype": "float32"}
    save_tensors(path, init_gpt2_tensors(config, seed))
    write_config(path, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
