"""LoRA, backend-neutral: the target names, their modules in each architecture, and the PEFT
adapter format. Mirrors: `ppo_jax.models.lora` (our own adapters on the scanned, stacked layers)
and `ppo_torch.models.lora` (Hugging Face `peft`).

A LoRA adapter adds to a projection y = x W + b the low-rank term (x A B) * alpha / rank, with
A [in, rank], B [rank, out]; B starts at zero, so a fresh adapter leaves the model unchanged.
Only A and B are trained; W and b stay frozen (Hu et al. 2021; peft's `LoraConfig`).

Targets are named once for every architecture (`LORA_TARGETS`): the attention's q, k, v, o and
the MLP's gate, up, down projections. `LORA_MODULES` maps each to the module (its path inside a
decoder layer, as Hugging Face names it) of each architecture. GPT-2 and GPT-NeoX compute q, k
and v in ONE fused projection (`attn.c_attn`, `attention.query_key_value`): any of q, k, v puts
an adapter on the whole fused projection -- as peft does for them, there is no adapter on q
alone -- and they have no gate projection (naming "gate" for them is an error).

The PEFT format (`adapter_config.json` + `adapter_model.safetensors`) is what `peft` writes and
`peft.PeftModel.from_pretrained` reads: tensors named
`base_model.model.<HF module name>.lora_A.weight` [rank, in] and `...lora_B.weight` [out, rank]
(nn.Linear layout, GPT-2's Conv1D modules included), `adapter_config.json` a `LoraConfig`.
A scalar-head model's adapter (a reward model's: peft's SEQ_CLS task) also holds its trained
score head, as peft saves it: `base_model.model.score.weight` [1, hidden], with
`modules_to_save: ["classifier", "score"]` in the config; the reward gain / bias, which peft has
no place for, go in `reward_normalisation.json` next to them (`save_model_adapter`).
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
"""The names `lora_targets` accepts (every config, `ModelOptions`)."""
DEFAULT_LORA_TARGETS = ("q", "v")
"""The LoRA paper's and peft's default for Llama: the query and value projections."""
LORA_ROLES = ("policy", "critic", "reward")
"""The models `lora_roles` may name (each config allows the ones its trainer builds and trains)."""

_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
          "down": "mlp.down_proj"}
LORA_MODULES: dict[str, dict[str, str]] = {
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "gpt_neox": {"q": "attention.query_key_value", "k": "attention.query_key_value",
                 "v": "attention.query_key_value", "o": "attention.dense",
                 "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
}
"""target -> the module inside one decoder layer that gets the adapter, per model_type."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SCORE_MODULES = ("classifier", "score")
"""peft's `modules_to_save` for the SEQ_CLS task: the head, trained and saved whole (ours: score)."""
HEAD_TENSOR = "score.weight"
"""The score head's tensor in a SEQ_CLS adapter (under PEFT_PREFIX), [1, hidden]."""
REWARD_NORMALISATION = "reward_normalisation.json"
"""A reward model adapter dir's {"reward_gain", "reward_bias"} (a full checkpoint keeps them in
config.json's "ppo_rlhf" key)."""

PathLike = str | os.PathLike


def check_lora_options(owner: str, rank: Any, alpha: Any, dropout: Any, targets: Any) -> None:
    """The one check of the LoRA options (`ModelOptions`, and the same fields of the three
    configs): a ValueError naming `owner`.field and what is allowed."""
    def fail(name: str, value: Any, allowed: str) -> None:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: allowed {allowed}")

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        fail("lora_rank", rank, "an integer >= 0 (0 = no LoRA)")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha)
            or alpha <= 0):
        fail("lora_alpha", alpha, "a finite number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        fail("lora_dropout", dropout, "a number in [0, 1)")
    if (not isinstance(targets, tuple) or not targets
            or any(t not in LORA_TARGETS for t in targets) or len(set(targets)) != len(targets)):
        fail("lora_targets", targets, "distinct names among " + ", ".join(LORA_TARGETS))


def lora_targets(value: Any) -> Any:
    """`lora_targets` as given in a config, a JSON file ("q,v", a list) -> a tuple; anything
    else unchanged (the check names it)."""
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    if isinstance(value, list):
        return tuple(value)
    return value


def lora_modules(model_type: str, targets: Iterable[str]) -> tuple[str, ...]:
    """The modules inside a decoder layer of `model_type` that get adapters for `targets`
    (sorted, each once); ValueError for a target the architecture does not have."""
    table = LORA_MODULES[model_type]
    missing = [t for t in targets if t not in table]
    if missing:
        raise ValueError(f"lora_targets {missing} do not exist in a {model_type} model: it has "
                         f"{', '.join(t for t in LORA_TARGETS if t in table)}")
    return tuple(sorted({table[t] for t in targets}))


def targets_of(model_type: str, tensors: Iterable[str]) -> tuple[str, ...]:
    """The targets (`LORA_TARGETS` order) whose modules hold adapters among the tensor names
    `tensors` ('<module>.lora_A.weight', as `read_adapter` gives them); ValueError if an adapter
    sits on a module no target names."""
    modules = {n.rsplit(".lora_", 1)[0] for n in tensors if ".lora_" in n}
    table = LORA_MODULES[model_type]
    found = [t for t in LORA_TARGETS if t in table and any(m.endswith("." + table[t]) for m in modules)]
    known = {table[t] for t in found}
    stray = sorted(m for m in modules if not any(m.endswith("." + k) for k in known))
    if stray or not found:
        raise ValueError(f"adapter modules {stray[:4] or sorted(modules)[:4]} are none of the LoRA "
                         f"targets of a {model_type} model ({', '.join(table.values())})")
    return tuple(found)


def scaling(rank: int, alpha: float) -> float:
    """alpha / rank: the factor of the adapter's term (peft's, without rsLoRA)."""
    return float(alpha) / rank


def init_lora_a(module: str, rank: int, in_features: int) -> np.ndarray:
    """The initial A [rank, in] (nn.Linear layout) of the adapter on the HF module `module`
    (e.g. 'model.layers.0.self_attn.q_proj'): uniform in +-1/sqrt(in) -- peft's kaiming-uniform
    bound -- drawn with numpy from a seed fixed by the module's name, so both cores start from
    the same adapters (as `hf_checkpoint.init_score_head` does for a fresh head); B starts at 0."""
    bound = 1.0 / np.sqrt(in_features)
    seed = zlib.crc32(module.encode())
    return np.random.default_rng(seed).uniform(-bound, bound, (rank, in_features)).astype(np.float32)


def peft_config(*, model_type: str, rank: int, alpha: float, dropout: float,
                modules: Iterable[str], base_model: str | None = None,
                task_type: str = "CAUSAL_LM") -> dict[str, Any]:
    """The `adapter_config.json` of our adapters (the keys `peft.LoraConfig` reads). GPT-2's
    projections are `Conv1D` (weight [in, out]): fan_in_fan_out=True, as peft sets for it. A
    SEQ_CLS adapter saves the score head whole (`modules_to_save`, as peft sets it)."""
    return {
        "peft_type": "LORA", "task_type": task_type, "r": int(rank), "lora_alpha": float(alpha),
        "lora_dropout": float(dropout), "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": model_type == "gpt2", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": list(SCORE_MODULES) if task_type == "SEQ_CLS" else None, "inference_mode": True,
        "base_model_name_or_path": base_model, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def check_adapter_fits(path: PathLike, config: Mapping[str, Any], options: Any) -> None:
    """CheckpointError unless the adapter of `config` (its adapter_config.json) has the rank
    and the scale of the model built with `options` (a `ModelOptions`)."""
    from ppo_rlhf.errors import CheckpointError

    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if (not options.lora or rank != options.lora_rank
            or not np.isclose(scaling(rank, alpha), scaling(options.lora_rank, options.lora_alpha))):
        raise CheckpointError(f"{path}: adapter r={rank}, lora_alpha={alpha}; the model was built with "
                              f"lora_rank={options.lora_rank}, lora_alpha={options.lora_alpha} (build it "
                              f"with adapter_options)")


def write_adapter(path: PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> Path:
    """Write a PEFT adapter dir: `adapter_config.json` and `adapter_model.safetensors` (tensors
    under their full PEFT names). Refuses a dir that holds a full checkpoint (config.json): the
    loaders would go on reading that dir as the old model, not as the adapter."""
    from safetensors.numpy import save_file

    from ppo_rlhf.errors import CheckpointError

    path = Path(path)
    if (path / "config.json").is_file():
        raise CheckpointError(f"{path} holds a full checkpoint (config.json): an adapter written there would be "
                              f"read as that model; write the adapter to another dir")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return path


def save_model_adapter(path: PathLike, *, model_type: str, options: Any, tensors: Mapping[str, np.ndarray],
                       head: np.ndarray | None = None, reward: tuple[float, float] | None = None,
                       base_model: str | None = None) -> Path:
    """Both cores' `save_adapter`: a model's adapters (`tensors`, named without the PEFT prefix)
    as a PEFT adapter dir, its config from the model's `options` (a `ModelOptions`). A scalar-head
    model (peft's SEQ_CLS task) gives its score head `head` [1, hidden] (saved as peft does:
    `HEAD_TENSOR`, `modules_to_save`) and its (reward_gain, reward_bias) `reward`
    (`REWARD_NORMALISATION`); a causal LM neither."""
    if not options.lora:
        raise ValueError("save_adapter: the model has no LoRA adapters (built with lora_rank=0)")
    scalar = head is not None
    if scalar:
        tensors = {**tensors, HEAD_TENSOR: np.asarray(head, np.float32).reshape(1, -1)}
    config = peft_config(model_type=model_type, rank=options.lora_rank, alpha=options.lora_alpha,
                         dropout=options.lora_dropout, modules=lora_modules(model_type, options.lora_targets),
                         base_model=base_model, task_type="SEQ_CLS" if scalar else "CAUSAL_LM")
    path = write_adapter(path, config, {PEFT_PREFIX + k: v for k, v in tensors.items()})
    if scalar:
        gain, bias = reward if reward is not None else (1.0, 0.0)
        (path / REWARD_NORMALISATION).write_text(json.dumps(
            {"reward_gain": float(gain), "reward_bias": float(bias)}, indent=2, sort_keys=True) + "\n")
    return path


def read_reward_normalisation(path: PathLike) -> tuple[float, float]:
    """(reward_gain, reward_bias) of a reward model adapter dir (`REWARD_NORMALISATION`); (1, 0)
    when the file is absent (an adapter `peft` wrote)."""
    f = Path(path) / REWARD_NORMALISATION
    if not f.is_file():
        return 1.0, 0.0
    meta = json.loads(f.read_text())
    return float(meta["reward_gain"]), float(meta["reward_bias"])


def is_scalar_adapter(path: PathLike) -> bool:
    """Is the adapter dir `path` a scalar-head model's (its config's task_type SEQ_CLS)?"""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("task_type") == "SEQ_CLS"


def merged_load(options: Any) -> bool:
    """`load_pretrained(<adapter dir>, options=options)`: are the adapters merged into the base
    (options given without LoRA: a plain model), or kept (None: the adapter's own options; LoRA
    options: those, checked against it)?"""
    return options is not None and not options.lora


def require_full_base(path: Any, what: str, lora: bool) -> None:
    """UsageError when a model that gets NEW adapters (`lora`) starts from the
    adapter dir `path`: its adapter's base must be a full checkpoint (a chain of adapters is no
    PEFT format; PPO's reference would be the base without the first adapter)."""
    from ppo_rlhf.errors import UsageError

    if lora and isinstance(path, (str, os.PathLike)) and adapter_base(path) is not None:
        raise UsageError(f"{what} {str(path)!r} is a LoRA adapter dir: new LoRA adapters need a full "
                         f"checkpoint as their base -- pass its merged checkpoint ({Path(path) / 'merged'}, "
                         f"written with --merge) or train without --lora-rank")


def adapter_options(path: PathLike, base: PathLike, options: Any = None) -> Any:
    """`options` (a `ModelOptions`; default the defaults) with the LoRA fields of the PEFT adapter
    at `path` for the base checkpoint `base` (its model_type): rank, alpha and the targets whose
    modules hold adapters."""
    import dataclasses

    from ppo_rlhf import hf_checkpoint as hfc
    from ppo_rlhf.config import ModelOptions

    config, tensors = read_adapter(path)
    return dataclasses.replace(options or ModelOptions(), lora_rank=int(config["r"]),
                               lora_alpha=float(config["lora_alpha"]),
                               lora_targets=targets_of(hfc.read_config(base)["model_type"], tensors))


def adapter_dir_options(path: PathLike, base: PathLike, options: Any) -> Any:
    """Both cores' `load_pretrained(<adapter dir>)`: the options to build the base with --
    `options` with the adapter's LoRA fields; CheckpointError when `options` asked for other
    LoRA fields than the adapter has."""
    from ppo_rlhf.errors import CheckpointError

    built = options if options is not None and options.lora else None
    options = adapter_options(path, base, options)
    if built is not None and built != options:
        raise CheckpointError(f"{path}: adapter r={options.lora_rank}, lora_alpha={options.lora_alpha}, "
                              f"targets {options.lora_targets}; asked for lora_rank={built.lora_rank}, "
                              f"lora_alpha={built.lora_alpha}, lora_targets={built.lora_targets}")
    return options


def adapter_base(path: PathLike) -> Path | None:
    """The base checkpoint dir of the PEFT adapter dir `path` (its adapter_config.json's
    base_model_name_or_path), None when `path` is not an adapter dir (it holds config.json, or
    no adapter_config.json); CheckpointError when the adapter names no base dir that exists."""
    from ppo_rlhf.errors import CheckpointError

    path = Path(path)
    if (path / "config.json").is_file() or not (path / ADAPTER_CONFIG).is_file():
        return None
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{path}: a PEFT adapter whose base_model_name_or_path {base!r} is not a "
                              f"checkpoint dir (load its base and `load_adapter` it)")
    return Path(base)


def read_adapter(path: PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, {tensor name without the PEFT prefix and adapter name: array}) of a
    PEFT adapter dir, e.g. 'transformer.h.0.attn.c_attn.lora_A.weight' [rank, in], and a
    SEQ_CLS adapter's score head `HEAD_TENSOR`. Refuses what this code does not implement (not
    LoRA, DoRA, rsLoRA, per-module ranks, bias, modules_to_save other than the score head) with a
    one-line CheckpointError naming it."""
    from safetensors.numpy import load_file

    from ppo_rlhf.errors import CheckpointError

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter dir (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    unsupported = {"peft_type": config.get("peft_type") != "LORA",
                   "use_dora": bool(config.get("use_dora")), "use_rslora": bool(config.get("use_rslora")),
                   "rank_pattern": bool(config.get("rank_pattern")),
                   "alpha_pattern": bool(config.get("alpha_pattern")),
                   "bias": config.get("bias", "none") != "none",
                   "modules_to_save": bool(set(config.get("modules_to_save") or ()) - set(SCORE_MODULES))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{path}: adapter_config.json sets {', '.join(f'{k}={config.get(k)!r}' for k in bad)}; "
                              f"only plain LoRA is supported")
    tensors = {}
    for name, arr in load_file(str(path / ADAPTER_WEIGHTS)).items():
        name = name.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(
            ".lora_B.default.", ".lora_B.").replace(".modules_to_save.default.", ".")
        tensors[name] = arr
    return config, tensors


__all__ = ["LORA_TARGETS", "DEFAULT_LORA_TARGETS", "LORA_ROLES", "LORA_MODULES", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS", "PEFT_PREFIX", "check_lora_options", "lora_targets", "lora_modules",
           "targets_of", "scaling", "init_lora_a", "peft_config", "check_adapter_fits", "write_adapter", "read_adapter",
           "adapter_base", "save_model_adapter", "adapter_options", "adapter_dir_options", "SCORE_MODULES",
           "HEAD_TENSOR", "REWARD_NORMALISATION", "read_reward_normalisation", "is_scalar_adapter",
           "merged_load", "require_full_base"]
