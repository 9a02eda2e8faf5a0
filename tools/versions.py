"""Print the numerical stack this checkout runs on: Python, the libraries whose versions decide
the numbers (their kernels, summation orders and defaults) and the CPU.

    python tools/versions.py

`.ci/run` prints it before the tests and every pytest run prints it in its header (conftest.py),
so a failure on a fresh clone can be read against the stack that produced it.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("numpy", "scipy", "jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint",
            "torch", "transformers", "tokenizers", "safetensors", "ml_dtypes")


def versions() -> dict[str, str]:
    """name -> installed version ("-" when absent) for Python, PACKAGES and the CPU model."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    out["cpu"] = _cpu()
    return out


def _cpu() -> str:
    """The CPU's model name and its widest vector extension (what XLA and torch pick kernels by)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((i for i in ("avx512f", "avx2", "avx", "sse4_2") if i in flags), "")
    return f"{model}{f' ({isa})' if isa else ''}"


def line() -> str:
    """One line: name=version ... | cpu: ... (pytest's header)."""
    v = versions()
    cpu = v.pop("cpu")
    return " ".join(f"{k}={x}" for k, x in v.items()) + f" | cpu: {cpu}"


if __name__ == "__main__":
    for k, v in versions().items():
        print(f"{k:18s} {v}")
    sys.exit(0)
