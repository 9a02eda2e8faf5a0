"""Shared fixtures: tiny random Hugging Face checkpoints, built offline once per session."""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download (Makefile sets it too)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _jax_compilation_cache_dir() -> str:
    """One persistent XLA compilation cache for the whole test run (every xdist worker and every CLI
    subprocess a test starts inherits it): a fault test's resume run, for one, compiles what its
    first run compiled. Measured (README "Development"): cold, the JAX fault and stack tests take
    14-20% less time; a rerun on a warm cache a quarter; the whole cold default suite about the
    same, since most of its programs compile once. Results are the same executable either way. The
    directory is keyed by this CPU's feature flags, because XLA:CPU compiles for the host's
    instruction set; JAX's own key covers the program, XLA_FLAGS, the devices and the jax/jaxlib
    versions. Set PPO_RLHF_TEST_JAX_CACHE=0 to compile everything."""
    import hashlib
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    host = hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pytest_cache", f"jax-{host}")


def _xla_test_flags(flags: str, level: str) -> str:
    """XLA_FLAGS for the tests: `flags` plus LLVM's optimisation level `level` for XLA:CPU's
    generated code, unless `level` is "default" or `flags` already sets one."""
    if level == "default" or "xla_backend_optimization_level" in flags:
        return flags
    if not re.fullmatch(r"[0-3]", level):
        raise ValueError(f"PPO_RLHF_TEST_XLA_OPT must be 0-3 or 'default', got {level!r}")
    return f"{flags} --xla_backend_optimization_level={level}".strip()


# XLA:CPU compiles each program's fusions to machine code with LLVM, at -O2 by default. The tests'
# programs are tiny and many, so compiling is most of their JAX time. At -O0 (the HLO passes,
# fusion and buffer assignment are the same; matmuls are library calls either way) the default
# suite took 745 s instead of 935 s (fresh state, quiet machine, issue 13). The generated code
# is another kernel set: float results differ in the last bits (e.g. FMA contraction), which
# the parity tolerances absorb by their mechanism anyway (README "Parity"). The slow suite
# (`make test-slow`: the demo, multi-device runs) sets PPO_RLHF_TEST_XLA_OPT=default and so runs
# the code users run. Every CLI subprocess a test starts inherits XLA_FLAGS.
os.environ["XLA_FLAGS"] = _xla_test_flags(os.environ.get("XLA_FLAGS", ""),
                                          os.environ.get("PPO_RLHF_TEST_XLA_OPT", "0"))

if os.environ.get("PPO_RLHF_TEST_JAX_CACHE", "1") != "0":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _jax_compilation_cache_dir())
    # Only programs that take 0.1 s or more to compile are written: the many tiny ones (each op
    # run eagerly, outside jit, compiles a program of its own in ~10-30 ms) cost more to write
    # than to compile again. Measured (issue 13; test_models_jax + RM parity + the fault tests
    # without the signal and bad-input ones, -n 2, an empty cache each run, both orders):
    # threshold 0 -> 940 programs written, 139-142 s; 0.1 s -> 78-82, 118-122 s; the whole
    # default suite on fresh clones: 3199 programs, 1079 s vs 812, 942 s (0.3 s: 416, 960 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # a size bound turns on JAX's file lock around every read and write: xdist workers and
    # subprocesses share the directory, and an unlocked write can be read half-written
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
else:  # and not the CLI's own cache in ~/.cache either (ppo_rlhf.runtime.compile_cache)
    os.environ.setdefault("PPO_RLHF_COMPILE_CACHE", "off")

# libtpu is installed for the TPU plans (tests/test_plan.py); without a TPU here, JAX runs on the
# CPU quietly in the tests and in every CLI process they start (ppo_rlhf.app.backends)
from ppo_rlhf.app.backends import skip_absent_accelerators  # noqa: E402

skip_absent_accelerators()

import pytest  # noqa: E402


def pytest_report_header(config):
    """The numerical stack of the run (tools/versions.py), so a failure reads against it."""
    from tools.versions import line

    return f"stack: {line()}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, **kw) -> Path: `ppo_rlhf.testing.make_tiny_checkpoint(dir, arch, **kw)`,
    built on first use and cached for the session (per xdist worker) by its arguments."""
    from ppo_rlhf.testing import make_tiny_checkpoint

    cache: dict = {}

    def get(arch: str, **kw):
        key = (arch, repr(sorted(kw.items())))  # values may be dicts (rope_parameters)
        if key not in cache:
            name = "-".join([arch] + [f"{k}={v}" for k, v in sorted(kw.items())])
            name = re.sub(r"[^A-Za-z0-9_.=-]", "_", name)[:80]
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures(...)`):
    tiny models gain nothing from intra-op threads, and on a busy 2-core machine (pytest -n 2)
    OpenMP threads spinning against each other make a 40 ms generation take seconds."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
