"""What the end-to-end tests share: the `ppo-rlhf` CLI in a subprocess, tiny PPO settings, test
reward functions (importable by the CLI as `tests.helpers:NAME`), metrics, and directories built
once per test session and shared by the xdist workers."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "batch_size=4", "--set", "max_new_tokens=6", "--set", "max_prompt_len=8",
         "--set", "ppo_epochs=2", "--set", "num_minibatches=2", "--set", "learning_rate=0.001"]
"""PPOConfig overrides of the CLI tests: 2 epochs x 2 minibatches = 4 optimiser steps/iteration."""
SMALL_CONFIG = dict(batch_size=4, max_new_tokens=6, max_prompt_len=8, ppo_epochs=2,
                    num_minibatches=2, learning_rate=1e-3)
PROMPTS = "the quick\nbrown fox\na good answer\nis short\nkind and\ntrue words\n"

_calls = {"n": 0}


def length_reward(prompts, responses):
    """The CLI tests' reward (`--reward-fn tests.helpers:length_reward`). Environment hooks, to
    fault a run at a deterministic point of an iteration (counted in reward calls, one per
    iteration):
      PPO_TEST_KILL_AT=N, PPO_TEST_SIGNAL=KILL|TERM|INT  signal its own process at call N;
      PPO_TEST_HUGE_FROM=N  from call N on, score 3e38: finite (accepted), but the value loss
                            (V - R)^2 overflows float32, so every PPO update is non-finite."""
    _calls["n"] += 1
    kill_at = int(os.environ.get("PPO_TEST_KILL_AT", "0"))
    if kill_at and _calls["n"] == kill_at:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("PPO_TEST_SIGNAL", "KILL")))
    huge_from = int(os.environ.get("PPO_TEST_HUGE_FROM", "0"))
    if huge_from and _calls["n"] >= huge_from:
        return [3e38] * len(responses)
    return [0.1 * len(r.split()) - 0.01 * len(r) for r in responses]


def nan_reward(prompts, responses):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def write_prompts(directory: Path, text: str = PROMPTS, name: str = "prompts.txt") -> Path:
    p = Path(directory) / name
    p.write_text(text)
    return p


# ---- the CLI -------------------------------------------------------------------------------------
def run_module(module: str, *args: Any, env: dict | None = None, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a subprocess (offline, from the repository root); with
    `check`, a non-zero exit fails the test showing the output."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}")
    return proc


def cli(*args: Any, env: dict | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ppo_rlhf ARGS` in a subprocess (offline, from the repository root)."""
    return run_module("ppo_rlhf", *args, env=env, check=check, timeout=timeout)


def train(backend: str, ckpt: Path, prompts: Path, out: Path, *extra: Any, env: dict | None = None,
          check: bool = True, reward: str = "length_reward") -> subprocess.CompletedProcess:
    """`ppo-rlhf train` on the tiny settings with a reward of this module."""
    return cli("train", "--backend", backend, "--policy", ckpt, "--reward-fn",
               f"tests.helpers:{reward}", "--prompts", prompts, "--out", out, "--no-progress",
               *SMALL, *extra, env=env, check=check)


def assert_one_line_error(proc: subprocess.CompletedProcess, returncode: int, *expected: str) -> str:
    """The command failed with `returncode` and printed exactly one line to stderr: its error,
    with every `expected` piece in it and no traceback. Returns that line."""
    err = proc.stderr
    assert proc.returncode == returncode, f"exit {proc.returncode}, expected {returncode}\n{err}"
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line:\n{err}"
    assert "Traceback" not in err and ": error: " in err, err
    for piece in expected:
        assert piece in err, f"{piece!r} not in\n{err}"
    return err.strip()


def metrics(run: Path) -> list[dict]:
    """The run's metrics.jsonl without timings (what must repeat exactly)."""
    recs = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


# ---- shared across xdist workers -------------------------------------------------------------------
def built_once(tmp_path_factory: Any, name: str, build: Callable[[Path], None]) -> Path:
    """A directory `build(dir)` fills once per test session, however many xdist workers ask for
    it (the others wait on a file lock, then reuse it). Treat it as read-only: copy it first
    (`copy_of`) to change anything."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, shared by its workers
    path, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
                build(path)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_trainer(backend: str, ckpt: Path, reward: Any = length_reward, prompts: Any = None,
                 policy: Any = None, **kw: Any) -> Any:
    """A PPO trainer of `backend` on the tiny settings (policy: `ckpt`, or a loaded model);
    PPOConfig fields and trainer keywords both go in `kw`."""
    from ppo_rlhf import PPOConfig

    fields = set(PPOConfig.__dataclass_fields__)
    config = PPOConfig(**{**SMALL_CONFIG, **{k: v for k, v in kw.items() if k in fields}})
    if backend == "jax":
        from ppo_jax.ppo import PPOTrainer
    else:
        from ppo_torch.ppo import PPOTrainer
    return PPOTrainer(str(ckpt) if policy is None else policy, reward,
                      ["a b", "c d e", "f", "g h"] if prompts is None else prompts,
                      config=config, **{k: v for k, v in kw.items() if k not in fields})
