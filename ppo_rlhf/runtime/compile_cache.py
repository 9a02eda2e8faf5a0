"""XLA's persistent compilation cache for the command line's JAX runs.

A JAX run compiles each of its programs (the sampler, the scoring forwards, the update) before
its first step: in the demo, about 50 programs and ~26 s of its ~170 s on a 2-core CPU (measured with
JAX_LOG_COMPILES=1), which is all of the time it trails PyTorch by. The next run of the same
shapes and settings compiles the same programs; with the cache it reads them from disk instead.
JAX's own key covers the program, the compiler flags, the devices and the jax/jaxlib versions,
so a hit is the executable a fresh compilation would give.

`ppo-rlhf` turns the cache on for `--backend jax` commands, when the command first reaches the JAX
backend (`ppo_rlhf.app.backends.use_compile_cache`, through the core's
`Backend.enable_compile_cache`; the library does not: importing `ppo_jax` changes no global
setting). PPO_RLHF_COMPILE_CACHE=off turns it off, =DIR moves it (default:
$XDG_CACHE_HOME/ppo-rlhf/jax, else ~/.cache/ppo-rlhf/jax). A cache configured through JAX itself
(JAX_COMPILATION_CACHE_DIR) is left as it is, and so is a threshold set there
(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS; default here MIN_COMPILE_S).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "PPO_RLHF_COMPILE_CACHE"
OFF = ("0", "off", "false", "no")
MIN_COMPILE_S = 0.5   # the demo's samplers compile in ~1 s; JAX's default threshold is 1 s
MAX_BYTES = 2 << 30   # least recently used entries go beyond this (JAX's own eviction)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppo-rlhf" / "jax"


def enable_jax_compile_cache(setting: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache before anything compiles. `setting` (default:
    $PPO_RLHF_COMPILE_CACHE): "" for the default directory, a directory, or "off". Returns the
    directory in use, or None when the cache stays off. A directory that cannot be created is a
    warning, not an error: the run goes on without the cache."""
    setting = os.environ.get(ENV, "") if setting is None else setting
    if setting.strip().lower() in OFF:
        return None
    import jax

    if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false
        return None
    if jax.config.jax_compilation_cache_dir:  # set through JAX (JAX_COMPILATION_CACHE_DIR): theirs
        return jax.config.jax_compilation_cache_dir
    path = Path(setting).expanduser() if setting.strip() else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"XLA compilation cache off: cannot create {str(path)!r} ({e.strerror or e}); "
                      f"set {ENV}=DIR or {ENV}=off")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else JAX's, as set there
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return str(path)
