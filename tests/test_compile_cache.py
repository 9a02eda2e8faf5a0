"""The CLI's persistent XLA compilation cache (ppo_rlhf/runtime/compile_cache.py): on by default
for JAX runs, off or moved by PPO_RLHF_COMPILE_CACHE, JAX's own settings respected, and a second
run of the same command compiles nothing new."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, built_once, train, write_prompts

PROBE = """
import json, warnings
import jax
from ppo_rlhf.runtime.compile_cache import enable_jax_compile_cache
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    got = enable_jax_compile_cache()
print(json.dumps({"got": got, "dir": jax.config.jax_compilation_cache_dir,
                  "min_s": jax.config.jax_persistent_cache_min_compile_time_secs,
                  "warnings": [str(x.message) for x in w]}))
"""


def _probe(env: dict) -> dict:
    # without the test suite's own cache settings (conftest.py)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
         "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE", "PPO_RLHF_COMPILE_CACHE"))}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                         env={**e, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_directory_moved_and_off(tmp_path):
    r = _probe({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    want = str(tmp_path / "xdg" / "ppo-rlhf" / "jax")
    assert r["got"] == r["dir"] == want and Path(want).is_dir() and r["min_s"] == 0.5
    r = _probe({"PPO_RLHF_COMPILE_CACHE": str(tmp_path / "mine")})
    assert r["got"] == r["dir"] == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
    # a threshold set through JAX is JAX's
    r = _probe({"PPO_RLHF_COMPILE_CACHE": str(tmp_path / "mine"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"})
    assert r["got"] == str(tmp_path / "mine") and r["min_s"] == 0.2
    for off in ("off", "0", "OFF"):
        r = _probe({"PPO_RLHF_COMPILE_CACHE": off, "XDG_CACHE_HOME": str(tmp_path / "off")})
        assert r["got"] is None and r["dir"] is None and not (tmp_path / "off").exists()


def test_jax_own_settings_win(tmp_path):
    r = _probe({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "theirs"),
                "PPO_RLHF_COMPILE_CACHE": str(tmp_path / "mine")})
    assert r["got"] == r["dir"] == str(tmp_path / "theirs") and not (tmp_path / "mine").exists()
    assert r["min_s"] == 1.0  # JAX's default, untouched
    r = _probe({"JAX_ENABLE_COMPILATION_CACHE": "false", "PPO_RLHF_COMPILE_CACHE": str(tmp_path / "m2")})
    assert r["got"] is None and not (tmp_path / "m2").exists()


def test_a_directory_that_cannot_be_made_is_a_warning(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    r = _probe({"PPO_RLHF_COMPILE_CACHE": str(tmp_path / "file" / "cache")})
    assert r["got"] is None and r["dir"] is None
    assert len(r["warnings"]) == 1 and "XLA compilation cache off: cannot create" in r["warnings"][0]


def test_second_cli_run_compiles_nothing_new(tmp_path_factory, tmp_path):
    from ppo_rlhf.testing import make_tiny_checkpoint

    ckpt = built_once(tmp_path_factory, "compile-cache-gpt2", lambda d: make_tiny_checkpoint(d, "gpt2"))
    prompts = write_prompts(tmp_path)
    cache = tmp_path / "cache"
    # JAX_COMPILATION_CACHE_DIR="" undoes the test suite's own cache (conftest.py) for these runs;
    # every program is written (threshold 0): with the CLI's 0.5 s, a program that compiled in
    # 0.45 s in one run and 0.55 s in the next was written by the second only (seen in CI)
    env = {"PPO_RLHF_COMPILE_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    entries = lambda: sorted(p.name for p in cache.glob("*-cache"))  # atime files aside
    train("jax", ckpt, prompts, tmp_path / "a", "--iterations", "1", env=env)
    first = entries()
    assert first, "the first run wrote no compiled program to the cache"
    train("jax", ckpt, prompts, tmp_path / "b", "--iterations", "1", env=env)
    assert entries() == first  # every program of the second run was found there


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_commands_that_never_reach_jax_do_not_import_it(backend, tmp_path):
    """A torch command, or a JAX one refused before it reaches the backend (bad input), neither
    imports jax for the cache nor creates its directory."""
    e = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = ("import sys; from ppo_rlhf.app.cli import main; "
            f"main(['eval', '--backend', '{backend}', '--policy', 'nope', '--prompts', 'x']); "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**e, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path),
                              "PPO_RLHF_COMPILE_CACHE": ""})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr
    assert not (tmp_path / "ppo-rlhf").exists()


def test_the_suite_compiles_xla_code_at_the_level_it_is_given():
    """conftest.py: the tests' XLA:CPU code is generated at LLVM -O0 (PPO_RLHF_TEST_XLA_OPT,
    "default" for the slow suite), appended to any XLA_FLAGS and never overriding one set there."""
    from conftest import _xla_test_flags

    level = os.environ.get("PPO_RLHF_TEST_XLA_OPT", "0")
    if level != "default":  # what this process (and every subprocess it starts) compiles with
        assert "--xla_backend_optimization_level=" in os.environ["XLA_FLAGS"]
    assert _xla_test_flags("", "0") == "--xla_backend_optimization_level=0"
    assert (_xla_test_flags("--xla_force_host_platform_device_count=8", "1")
            == "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
    assert _xla_test_flags("--xla_backend_optimization_level=2", "0") == "--xla_backend_optimization_level=2"
    assert _xla_test_flags("--xla_cpu_max_isa=SSE4_2", "default") == "--xla_cpu_max_isa=SSE4_2"
    with pytest.raises(ValueError, match="PPO_RLHF_TEST_XLA_OPT"):
        _xla_test_flags("", "fast")
