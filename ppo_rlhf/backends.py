"""The two backends by name: the one place where backend-neutral code (CLI, demo, evaluation,
labelling) reaches `ppo_jax.<module>` or `ppo_torch.<module>`. Imports are lazy: `ppo_rlhf`
imports neither backend at module level, and a missing one is a UsageError naming its extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from ppo_rlhf.errors import UsageError

BACKENDS = ("jax", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def backend_module(backend: str, module: str) -> ModuleType:
    """`ppo_<backend>.<module>` (e.g. backend_module("jax", "ppo") is `ppo_jax.ppo`)."""
    check_backend(backend)
    try:
        return importlib.import_module(f"ppo_{backend}.{module}")
    except ImportError as e:
        raise UsageError(f"the {backend} backend is not installed ({e}); "
                         f"pip install 'ppo-rlhf[{backend}]'") from None
