"""The benchmarks (see benchmarks/README.md)."""

import os
import sys


def compile_every_program() -> None:
    """Turn JAX's persistent compilation cache off in this benchmark process and the processes
    it starts. Compile time is something the benchmarks measure (the first iteration minus the
    median), and a cache turned on from outside (the test suite sets JAX_COMPILATION_CACHE_DIR for
    everything it starts) would make it a file read. Does not import jax (a torch run's peak RSS
    must not carry it). Also, as the CLI does (`skip_absent_accelerators`), JAX stays off a TPU or GPU
    runtime whose plugin is installed (libtpu for the plans) but whose device is absent: no
    libtpu error lines and ~0.7 s less in every benchmark process here."""
    from ppo_rlhf.app.backends import skip_absent_accelerators

    skip_absent_accelerators()
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    os.environ["PPO_RLHF_COMPILE_CACHE"] = "off"  # the CLI's cache (ppo_rlhf.runtime.compile_cache)
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_enable_compilation_cache", False)
