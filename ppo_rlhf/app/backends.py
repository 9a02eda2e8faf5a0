"""The two backends by name: the one place where the application (CLI, demo, pipelines, the
labelling tools) reaches a core, as the `ppo_rlhf.backend.Backend` it exports
(`ppo_<name>.backend.BACKEND`). Imports are lazy: `ppo_rlhf` imports neither core at module level,
and a missing one is a UsageError naming its extra."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ppo_rlhf.backend import Backend
from ppo_rlhf.errors import UsageError

BACKENDS = ("jax", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def skip_absent_accelerators() -> None:
    """libtpu installed (the `tpu` extra, for `ppo-rlhf plan`) on a machine without a TPU: JAX
    would try to start the TPU runtime in every process -- a few lines of libtpu errors on stderr
    and ~0.7 s -- before falling back; jax's CUDA plugin (the `gpu-plan` extra) on a machine
    without a GPU, the same with CUDA. Unless JAX_PLATFORMS says otherwise, run on the CPU where
    no TPU device file (/dev/accel*, /dev/vfio/<n>) and no NVIDIA device file exists. Compiling
    for a TPU topology or a GPU (`ppo_jax.plan`) needs neither."""
    import importlib.util

    from ppo_rlhf.runtime.processes import gpu_device_present, tpu_device_present

    def installed(*modules: str) -> bool:
        return any(importlib.util.find_spec(m) is not None for m in modules)

    if "JAX_PLATFORMS" in os.environ or not installed("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"):
        return
    if ((tpu_device_present() and installed("libtpu"))
            or (gpu_device_present() and installed("jax_cuda12_plugin", "jax_cuda13_plugin"))
            or installed("jax_rocm7_plugin")):
        return  # an accelerator JAX can drive (or an AMD plugin, whose devices we do not look for)
    os.environ["JAX_PLATFORMS"] = "cpu"


_COMPILE_CACHE = {"wanted": False, "done": False}


def use_compile_cache() -> None:
    """Called by the CLI: the first `get_backend` of a core that has a persistent compilation cache
    (jax: XLA's, `ppo_rlhf.runtime.compile_cache`) turns it on, before anything compiles (which
    JAX requires). A command that fails before it reaches a backend
    never imports jax; the Python API never turns the cache on."""
    _COMPILE_CACHE["wanted"] = True


def get_backend(backend: str) -> Backend:
    """The core named `backend` ("jax" or "torch"): `ppo_<backend>.backend.BACKEND`."""
    check_backend(backend)
    try:
        core = importlib.import_module(f"ppo_{backend}.backend").BACKEND
    except ImportError as e:
        raise UsageError(f"the {backend} backend is not installed ({e}); "
                         f"pip install 'ppo-rlhf[{backend}]'") from None
    if _COMPILE_CACHE["wanted"] and not _COMPILE_CACHE["done"] and core.enable_compile_cache is not None:
        _COMPILE_CACHE["done"] = True  # importing a core compiles nothing: still in time
        core.enable_compile_cache()
    return core


def load_policy_sampler(backend: str, policy_dir: str | os.PathLike[str], *,
                        max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0) -> Any:
    """A `ppo_rlhf.feedback.samplers.PolicySampler` drawing from the policy checkpoint in
    `policy_dir` with `backend`'s `sample_texts`: `sample(prompts, k)` gives `k`
    independent responses per prompt of at most `max_new_tokens` tokens at `temperature`
    (stopping at the tokenizer's EOS), decoded without the prompt and special tokens. Bad
    arguments (a missing directory, no tokenizer or model in it, a backend that is not installed,
    a prompt too long for the model) raise `UsageError`."""
    from ppo_rlhf import tokens
    from ppo_rlhf.feedback.samplers import PolicySampler

    check_backend(backend)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise UsageError(f"temperature must be a number > 0, got {temperature!r}")
    path = Path(policy_dir)
    if not path.is_dir():
        raise UsageError(f"policy {str(path)!r}: not a directory")
    if not tokens.has_tokenizer(path):
        # transformers 5 would build an EMPTY tokenizer from config.json alone
        raise UsageError(f"policy {str(path)!r}: no tokenizer saved there (none of "
                         f"{', '.join(tokens.TOKENIZER_FILES)})")
    tokenizer = tokens.load_tokenizer(path)
    core = get_backend(backend)
    try:
        model = core.for_sampling(core.load_pretrained(path))
    except (OSError, ValueError) as e:  # FileNotFoundError included: no config / weights
        raise UsageError(f"cannot load a policy from {str(path)!r}: {e}") from None
    tokens.check_vocab(tokenizer, {"policy": model.config.vocab_size})

    def draw(prompts: list[str], call: int) -> list[str]:
        return core.sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, stream=call).texts

    return PolicySampler(draw, eos_token_id=tokens.pad_and_eos(tokenizer)[1])
