"""Hugging Face checkpoints <-> Flax NNX models, without torch. Mirror: `ppo_torch/models/loading.py`.

Weights are read with `safetensors` (numpy; bfloat16 via ml_dtypes), single-file or sharded
(`model.safetensors.index.json`), and written back in the same layout with a `config.json`, so a
JAX-trained model loads in `transformers`.

Name mapping. Our module attributes carry HF's names below the top level, so a parameter path
maps to HF tensor names mechanically:
  ('backbone', 'layers', 'stack', 'self_attn', 'q_proj', 'kernel')  [L, in, out]
      <->  'model.layers.{i}.self_attn.q_proj.weight' for i < L   (slice i of the stacked array)
  top level: backbone -> transformer / model / gpt_neox; lm_head -> lm_head / embed_out;
             score_head (ScalarHeadModel) -> score
  stacked:   a `stack.ScannedBlocks` at path p (GPT-2's `h`, the others' `layers`) holds every
             layer's parameters with a leading layer axis under p + ('stack',): HF's p.{i}.rest
             is slice i (loading stacks the L tensors, saving unstacks them)
  leaf:      kernel -> weight (transposed: HF nn.Linear is [out, in], our kernel [in, out];
             except GPT-2's Conv1D blocks, already [in, out]); embedding, scale -> weight;
             bias -> bias.
Loading is strict: a parameter missing from the checkpoint, a shape mismatch or a checkpoint
tensor nobody uses (other than known buffers) is an error naming the tensors.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppo_jax.abstract import is_abstract
from ppo_jax.models.causal_lm import TRANSPOSE_BACKBONE_KERNELS, CausalLM
from ppo_jax.models.config import DTYPES, ModelConfig
from ppo_jax.models.heads import PolicyWithValueHead, ScalarHeadModel
from ppo_jax.models.lora import BASE_PARAMS, LoRADropoutKey, init_lora_param
from ppo_jax.models.stack import STACK, stacked_modules
from ppo_rlhf import hf_checkpoint as hfc
from ppo_rlhf import lora as lr
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError

PathLike = str | os.PathLike


def dtype_name(dtype: Any) -> str:
    """"float32" / "bfloat16" / "float64" from a name, a numpy/jnp dtype or None (= "float32")."""
    if dtype is None:
        return "float32"
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported: allowed {', '.join(DTYPES)}")
    return name


def hf_name(path: tuple, model_type: str) -> tuple[str, bool]:
    """(HF tensor name, transpose?) of an unstacked NNX parameter path, with layer i of a stack
    written as its index (('backbone', 'h', 0, 'attn', ...)); see the module docstring. A path
    into a stack is one array for every layer: ValueError (use `hf_names` or `model_tensors`)."""
    if STACK in path:
        raise ValueError(f"parameter {path} is stacked (one array for all layers): its HF names "
                         f"come from hf_names(path, model_type, stacked_modules(model)), or use "
                         f"model_tensors(model)")
    top, *mid, leaf = path
    if top == "backbone":
        prefix, transpose = hfc.BACKBONE_PREFIX[model_type], TRANSPOSE_BACKBONE_KERNELS[model_type]
    elif top == "lm_head":
        prefix, transpose = hfc.LM_HEAD_NAME[model_type], True
    elif top == "score_head":
        prefix, transpose = "score", True
    else:
        raise ValueError(f"no Hugging Face name for parameter {path}")
    suffix = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    name = ".".join([prefix, *(str(p) for p in mid), suffix])
    return name, transpose and leaf == "kernel"


def hf_names(path: tuple, model_type: str, stacks: dict[tuple, int]) -> tuple[list[str], bool, bool]:
    """(HF tensor names, transpose?, stacked?) of an NNX parameter path: one name, or for a
    parameter of a stack (`stacks`: `stack.stacked_modules(model)`) the name of each layer's
    slice, in layer order."""
    for prefix, num_layers in stacks.items():
        k = len(prefix)
        if path[:k] == prefix and path[k:k + 1] == (STACK,):
            names = [hf_name(prefix + (i,) + path[k + 1:], model_type) for i in range(num_layers)]
            return [n for n, _ in names], names[0][1], True
    name, transpose = hf_name(path, model_type)
    return [name], transpose, False


def _ignored(name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors that are fine to leave unused."""
    if name.endswith(hfc.IGNORED_SUFFIXES):
        return True
    # a tied model's checkpoint may still store the (identical) LM head
    return config.tie_word_embeddings and name == f"{hfc.LM_HEAD_NAME[config.model_type]}.weight"


def _build(make: Callable[[], nnx.Module], tensors: Any, config: ModelConfig, *, where: str,
           mesh: Any = None) -> nnx.Module:
    """Construct `make()` abstractly (no weight is ever initialised) and fill every parameter
    from `tensors` (HF names: a dict of numpy arrays or a `hfc.TensorSlices`), cast to
    config.dtype. tensors=None: the abstract model itself, every parameter a
    `jax.ShapeDtypeStruct` (planning and compiling without weights).
    mesh (a `jax.sharding.Mesh`): each parameter is built straight onto its shards, with the
    parameter rule of `ppo_jax.parallel` (`param_spec_at`: the layer axis of a stack and the
    rank axis of a LoRA adapter never split):
    `jax.make_array_from_callback` asks for each of this process's devices' slice, and only that
    slice is read (`_read_param`): no whole parameter is ever on the host."""
    abstract = nnx.eval_shape(make)
    if tensors is None:
        from ppo_jax.models.precision import store_base
        return store_base(abstract)  # a LoRA base stored in lora_base_dtype: its planned bytes
    source = tensors if isinstance(tensors, hfc.TensorSlices) else hfc.TensorSlices(tensors)
    stacks = stacked_modules(abstract)
    graphdef, state = nnx.split(abstract)
    dt = jnp.dtype(config.dtype)
    # a LoRA model's frozen base in lora_base_dtype (`precision.store_base`), read straight into it
    base_dt = None if config.options.base_dtype is None else jnp.dtype(config.options.base_dtype)
    place = _placer(mesh)
    filled, missing, used = [], [], set()
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, (nnx.LoRAParam, LoRADropoutKey)):  # LoRA: not in a base checkpoint, fresh
            fresh = (np.zeros(var.shape, var.dtype) if isinstance(var, LoRADropoutKey)  # set in training
                     else init_lora_param(path, var.shape, dt, config.model_type, stacks))
            filled.append((path, var.replace(place(path, fresh.shape, lambda index, a=fresh: a[index]))))
            continue
        names, transpose, stacked = hf_names(path, config.model_type, stacks)
        absent = [n for n in names if n not in source]
        if absent:
            missing.extend(absent)
            continue
        expected = tuple(var.shape)[1:] if stacked else tuple(var.shape)
        for name in names:
            shape = source.shape(name)
            shape = shape[::-1] if transpose else shape
            if shape != expected:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {shape}"
                                 f"{' (transposed)' if transpose else ''}, the model expects "
                                 f"{expected}")
        trained = any(h in path for h in ("score_head", "value_head"))  # `lora.trained_params`
        read = functools.partial(_read_param, source, names, transpose, stacked,
                                 dt if base_dt is None or trained else base_dt)
        filled.append((path, var.replace(place(path, tuple(var.shape), read))))
        used.update(names)
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"for a {config.model_type} model")
    unused = sorted(n for n in source.keys() if n not in used and not _ignored(n, config))
    if unused:
        raise CheckpointError(f"{where}: checkpoint tensor(s) {unused[:8]}{' ...' if len(unused) > 8 else ''}"
                         f" are not used by our {config.model_type} model (unsupported variant?)")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _read_param(source: hfc.TensorSlices, names: list[str], transpose: bool, stacked: bool,
                dtype: Any, index: tuple[slice, ...]) -> np.ndarray:
    """`parameter[index]` (`index`: a slice per dimension of OUR parameter) read from its HF
    tensors -- a stack's layer slice (index[0]) from the layers' tensors, a kernel's from the
    transposed region of HF's [out, in] tensor -- and cast to `dtype`, one tensor slice at a
    time: only the bytes of `index` are ever read."""
    index = tuple(index)
    if stacked:
        layers, index = range(len(names))[index[0]], index[1:]
        names = [names[i] for i in layers]
    parts = []
    for name in names:
        part = source.read(name, index[::-1] if transpose else index)
        parts.append((part.T if transpose else part).astype(dtype, copy=False))
    return np.stack(parts) if stacked else parts[0]


def _placer(mesh: Any) -> Callable[[tuple, tuple, Callable], Any]:
    """place(path, shape, read) -> the parameter at `path` as a jax array, from `read(index)`
    (its numpy values at a tuple of slices): one device: read whole; a mesh: sharded by the
    parameter rule (`ppo_jax.parallel.param_spec_at`), each device's shard read alone."""
    if mesh is None:
        return lambda path, shape, read: jnp.asarray(read((slice(None),) * len(shape)))
    from jax.sharding import NamedSharding

    from ppo_jax.parallel import param_spec_at

    def place(path: tuple, shape: tuple, read: Callable) -> Any:
        sharding = NamedSharding(mesh, param_spec_at(path, shape, mesh))
        return jax.make_array_from_callback(shape, sharding, read)
    return place


def _mesh(mesh: Any) -> Any:
    """A `jax.sharding.Mesh` from a Mesh or a mesh spec ("fsdp=8"); None stays None."""
    if mesh is None:
        return None
    from ppo_jax.parallel import make_mesh

    return make_mesh(mesh)


def _on_mesh(model: nnx.Module, mesh: Any) -> nnx.Module:
    """`model` with every parameter placed by the parameter rule (those already there stay
    where they are: a value head, small, comes from the host)."""
    if mesh is None:
        return model
    from ppo_jax.parallel import Placement

    nnx.update(model, Placement(mesh).params(nnx.state(model)))
    return model


def model_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """A model's weights under their HF names, as numpy (bfloat16 as ml_dtypes.bfloat16), in HF
    layout -- one tensor per layer (`h.{i}....`), unstacked -- what `save_pretrained` writes. A
    PolicyWithValueHead gives its LM's tensors. An array split across several processes' devices
    is all-gathered first (`ppo_jax.parallel.fetch`: a collective, every process must call)."""
    from ppo_jax.parallel import fetch

    if isinstance(model, PolicyWithValueHead):
        model = model.lm
    stacks = stacked_modules(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):  # no LoRA adapters
        names, transpose, stacked = hf_names(path, model.config.model_type, stacks)
        arr = np.asarray(fetch(var[...]))
        for name, a in zip(names, arr if stacked else [arr]):  # a stack: one tensor per layer
            out[name] = a.T if transpose else a
    return out


# ---- public API ----------------------------------------------------------------------------------
def load_pretrained(path: PathLike, dtype: Any = "float32", *, options: ModelOptions | None = None,
                    with_value_head: bool = False, seed: int = 0, abstract: bool = False,
                    mesh: Any = None) -> CausalLM | PolicyWithValueHead:
    """A causal LM from a Hugging Face checkpoint dir (gpt2, llama, qwen2, gpt_neox).

    dtype: "float32" (default) or "bfloat16" for weights and activations (logits stay float32);
    "float64" for numerics checks (everything in float64; needs jax_enable_x64).
    options: how the model runs (`ppo_rlhf.config.ModelOptions`: remat, scan_unroll,
    compute_dtype; default `ModelOptions()`), fixed from now on.
    with_value_head=True returns a `PolicyWithValueHead` (shared trunk): its value head is read
    from <path>/value_head.safetensors when present, else drawn fresh from `seed`
    (`ppo_rlhf.hf_checkpoint.init_score_head`, identical in both backends).
    abstract=True reads config.json alone (the dir needs no weights) and returns the same model
    with every parameter a `jax.ShapeDtypeStruct` (nothing allocated): what `ppo_jax.plan`
    compiles for a device it does not have.
    mesh (a `jax.sharding.Mesh` or a spec for `ppo_jax.parallel.make_mesh`, e.g. "fsdp=8"):
    every parameter is loaded straight onto its shards by the trainers' parameter rule, each
    process reading only its devices' slices of the checkpoint (no whole model, nor any whole
    parameter, in host memory); None: onto the default device.
    A PEFT adapter dir (`save_adapter`, `PPOTrainer.save_policy`, `ppo-rlhf pretrain --lora-rank`)
    loads as its base (adapter_config.json's base_model_name_or_path) + the adapter: with
    options None built with the adapter's LoRA options, the adapters kept; with LoRA options,
    those (they must be the adapter's); with options without LoRA, merged into the base
    (`merge_adapters`): a plain model with those options.
    Errors: FileNotFoundError (no dir / config.json / weights), ValueError (unsupported
    model_type, a scalar-head checkpoint, missing or unexpected tensors)."""
    base = lr.adapter_base(path)
    if base is not None:  # a PEFT adapter dir: base + adapter
        from ppo_jax.models.lora import load_adapter, merge_adapters

        if lr.is_scalar_adapter(path):
            raise CheckpointError(f"{path}: a scalar-head (value / reward) model's adapter; load it with "
                                  f"load_scalar_model")
        merged = lr.merged_load(options)
        if merged and abstract:  # a plain model: the base's shapes
            return load_pretrained(base, dtype, options=options, with_value_head=with_value_head, seed=seed,
                                   abstract=True)
        built = lr.adapter_options(path, base, options) if merged else lr.adapter_dir_options(path, base, options)
        model = load_pretrained(base, dtype, options=built, with_value_head=with_value_head, seed=seed,
                                abstract=abstract, mesh=mesh)
        if abstract:
            return model
        model = load_adapter(model, path)
        return _on_mesh(merge_adapters(model) if merged else model, _mesh(mesh))  # adapters: small
    hf = hfc.read_config(path)
    config = ModelConfig.from_hf(hf, dtype=dtype_name(dtype), options=options)
    if abstract:
        lm = _build(lambda: CausalLM(config, rngs=nnx.Rngs(0)), None, config, where=str(path))
        if not with_value_head:
            return lm
        return nnx.eval_shape(lambda: PolicyWithValueHead(
            CausalLM(config, rngs=nnx.Rngs(0)), hfc.init_score_head(config.hidden_size, seed)))
    mesh = _mesh(mesh)
    with hfc.TensorSlices(path) as tensors:  # read lazily: a mesh reads each device's slices only
        lm_head = f"{hfc.LM_HEAD_NAME[config.model_type]}.weight"
        if hfc.SCORE_NAME in tensors and lm_head not in tensors:
            raise CheckpointError(f"{path}: this is a scalar-head (value / reward) checkpoint (it "
                                  f"has {hfc.SCORE_NAME}, no {lm_head}); load it with load_scalar_model")
        lm = _build(lambda: CausalLM(config, rngs=nnx.Rngs(0)), tensors, config, where=str(path),
                    mesh=mesh)
    if not with_value_head:
        return lm
    head = hfc.load_value_head(path)
    if head is None:
        head = hfc.init_score_head(config.hidden_size, seed)
    return _on_mesh(PolicyWithValueHead(lm, head), mesh)


def load_scalar_model(path: PathLike, dtype: Any = "float32", *, options: ModelOptions | None = None,
                      abstract: bool = False, mesh: Any = None) -> ScalarHeadModel:
    """A value / reward model from a `*ForSequenceClassification` (num_labels=1) checkpoint dir;
    reward_gain / reward_bias are read from config.json's "ppo_rlhf" key (default 1, 0);
    `options` and `mesh` as `load_pretrained`.
    abstract=True: from config.json alone, parameters as `jax.ShapeDtypeStruct`s (see
    `load_pretrained`); a causal LM's config.json serves too (the score head is [H, 1]).
    A reward model's PEFT adapter dir (SEQ_CLS: `save_adapter`, `ppo-rlhf train-rm --lora-rank`)
    loads as its base (a causal LM, or a scalar-head checkpoint) + the adapter, its score head
    and its reward gain / bias (`ppo_rlhf.lora.REWARD_NORMALISATION`): with options None or
    without LoRA merged into the base (`merge_adapters`: a plain model -- how PPO, eval and the
    demo use a reward model); with LoRA options, those (the adapter's rank and scale), the
    adapters kept."""
    base = lr.adapter_base(path)
    if base is not None:
        return _load_scalar_adapter(path, base, dtype, options=options, abstract=abstract, mesh=mesh)
    hf = hfc.read_config(path)
    config = ModelConfig.from_hf(hf, dtype=dtype_name(dtype), options=options)
    if abstract:
        model = _build(lambda: ScalarHeadModel(config, rngs=nnx.Rngs(0)), None, config, where=str(path))
        model.reward_gain, model.reward_bias = hfc.reward_normalisation(hf)
        return model
    with hfc.TensorSlices(path) as tensors:  # read lazily: a mesh reads each device's slices only
        if hfc.SCORE_NAME not in tensors:
            raise CheckpointError(f"{path}: no {hfc.SCORE_NAME} in the checkpoint: it is not a "
                                  f"scalar-head model; to start one from a causal LM use scalar_model_from_lm")
        if tensors.shape(hfc.SCORE_NAME) != (1, config.hidden_size):
            raise CheckpointError(f"{path}: {hfc.SCORE_NAME} has shape {tensors.shape(hfc.SCORE_NAME)}; a "
                                  f"scalar head needs num_labels=1, i.e. (1, {config.hidden_size})")
        model = _build(lambda: ScalarHeadModel(config, rngs=nnx.Rngs(0)), tensors, config,
                       where=str(path), mesh=_mesh(mesh))
    gain, bias = hfc.reward_normalisation(hf)
    model.reward_gain, model.reward_bias = gain, bias
    return model


def _load_scalar_adapter(path: PathLike, base: Path, dtype: Any, *, options: ModelOptions | None,
                         abstract: bool, mesh: Any) -> ScalarHeadModel:
    """`load_scalar_model(<a SEQ_CLS adapter dir>)` (see there)."""
    from ppo_jax.models.lora import load_adapter, merge_adapters

    if not lr.is_scalar_adapter(path):
        raise CheckpointError(f"{path}: a causal LM's adapter, not a scalar-head model's (task_type SEQ_CLS); "
                              f"load it with load_pretrained")
    _, tensors = lr.read_adapter(path)
    if lr.HEAD_TENSOR not in tensors:
        raise CheckpointError(f"{path}: the adapter holds no score head ({lr.HEAD_TENSOR}, modules_to_save)")
    gain, bias = lr.read_reward_normalisation(path)
    merged = options is None or not options.lora
    if merged and abstract:  # a plain model: the base's shapes
        model = load_scalar_model(base, dtype, options=options, abstract=True)
        model.reward_gain, model.reward_bias = gain, bias
        return model
    built = lr.adapter_options(path, base, options) if merged else lr.adapter_dir_options(path, base, options)
    if abstract or hfc.is_scalar_checkpoint(base):
        model = load_scalar_model(base, dtype, options=built, abstract=abstract)
    else:  # a causal LM: its trunk (the head comes from the adapter)
        model = scalar_model_from_lm(base, dtype=dtype, options=built)
    if not abstract:
        model = load_adapter(model, path)
        model = merge_adapters(model) if merged else model
    model.reward_gain, model.reward_bias = gain, bias
    return model if abstract else _on_mesh(model, _mesh(mesh))


def scalar_model_from_lm(lm: PathLike | CausalLM | PolicyWithValueHead, *, seed: int = 0,
                         dtype: Any = None, options: ModelOptions | None = None,
                         reward_gain: float = 1.0, reward_bias: float = 0.0) -> ScalarHeadModel:
    """A value / reward model whose backbone is a copy of the causal LM `lm` (a checkpoint dir or
    a loaded model) and whose score head is fresh: `init_score_head(hidden_size, seed)`, drawn
    with numpy, so both backends build the same model from the same seed. dtype None keeps the
    LM's dtype (float32 for a path); options None the LM's options (`ModelOptions()` for a path)."""
    if isinstance(lm, (CausalLM, PolicyWithValueHead)) and options is None:
        options = lm.config.options
    if isinstance(lm, (CausalLM, PolicyWithValueHead)) and is_abstract(nnx.state(lm)):
        config = ModelConfig.from_hf(lm.config.hf_config, dtype=lm.config.dtype if dtype is None
                                     else dtype_name(dtype), options=options)
        model = _build(lambda: ScalarHeadModel(config, rngs=nnx.Rngs(0)), None, config, where="")
        model.reward_gain, model.reward_bias = float(reward_gain), float(reward_bias)
        return model
    if isinstance(lm, (CausalLM, PolicyWithValueHead)):
        config = lm.config
        tensors = model_tensors(lm)
        where = "scalar_model_from_lm(<model>)"
    else:
        hf = hfc.read_config(lm)
        config = ModelConfig.from_hf(hf, dtype="float32")
        tensors = hfc.load_tensors(lm)
        where = str(lm)
    dtype = config.dtype if dtype is None else dtype_name(dtype)
    config = ModelConfig.from_hf(config.hf_config, dtype=dtype, options=options)
    lm_head = f"{hfc.LM_HEAD_NAME[config.model_type]}.weight"
    tensors = {k: v for k, v in tensors.items() if k not in (lm_head, hfc.SCORE_NAME)}
    tensors[hfc.SCORE_NAME] = hfc.init_score_head(config.hidden_size, seed)
    model = _build(lambda: ScalarHeadModel(config, rngs=nnx.Rngs(0)), tensors, config, where=where)
    model.reward_gain, model.reward_bias = float(reward_gain), float(reward_bias)
    return model


def save_pretrained(model: CausalLM | ScalarHeadModel | PolicyWithValueHead, path: PathLike, *,
                    max_shard_bytes: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint dir that `transformers` loads: config.json (the
    original HF config with architectures / dtype updated; for a ScalarHeadModel the
    *ForSequenceClassification config with num_labels=1 and the reward gain/bias) and
    model.safetensors, sharded with an index above `max_shard_bytes`. Weights keep the model
    dtype. A PolicyWithValueHead also writes value_head.safetensors (float32). Returns the path."""
    path = Path(path)
    config = model.config
    hf = dict(config.hf_config)
    if isinstance(model, ScalarHeadModel):
        hf = hfc.scalar_config(hf, reward_gain=model.reward_gain, reward_bias=model.reward_bias)
    else:
        hf["architectures"] = [hfc.CAUSAL_LM_ARCH[config.model_type]]
        for key in ("id2label", "label2id", hfc.PPO_RLHF_KEY):
            hf.pop(key, None)
    dtype_key = "torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"
    hf[dtype_key] = config.dtype
    hfc.save_tensors(path, model_tensors(model), max_shard_bytes=max_shard_bytes)
    hfc.write_config(path, hf)
    if isinstance(model, PolicyWithValueHead):
        hfc.save_value_head(path, np.asarray(model.value_head.kernel[...], dtype=np.float32).T)
    return path
