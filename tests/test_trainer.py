"""The PPO trainers end to end on a tiny checkpoint, in both backends: the CLI, the Python API,
exact resume after SIGKILL, clean stop on SIGTERM, refusal of NaN rewards, skipping of non-finite
updates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppo_rlhf import PPOConfig

BACKENDS = ["jax", "torch"]
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "batch_size=4", "--set", "max_new_tokens=6", "--set", "max_prompt_len=8",
         "--set", "ppo_epochs=2", "--set", "num_minibatches=2", "--set", "learning_rate=0.001"]

_calls = {"n": 0}


def length_reward(prompts, responses):
    """Reward used by the CLI tests (importable as tests.test_trainer:length_reward). With
    PPO_TEST_KILL_AT=N and PPO_TEST_SIGNAL=KILL|TERM it signals its own process at call N, to
    interrupt a run at a deterministic point in the middle of an iteration."""
    _calls["n"] += 1
    kill_at = int(os.environ.get("PPO_TEST_KILL_AT", "0"))
    if kill_at and _calls["n"] == kill_at:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("PPO_TEST_SIGNAL", "KILL")))
    return [0.1 * len(r.split()) - 0.01 * len(r) for r in responses]


def nan_reward(prompts, responses):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def _prompts(tmp_path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("the quick\nbrown fox\na good answer\nis short\nkind and\ntrue words\n")
    return p


def _cli(*args, env=None, check=True):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "ppo_rlhf.cli", *args], capture_output=True,
                          text=True, env=e, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs]


def _train(backend, ckpt, prompts, out, *extra, env=None, check=True):
    return _cli("train", "--backend", backend, "--policy", str(ckpt), "--reward-fn",
                "tests.test_trainer:length_reward", "--prompts", str(prompts), "--out", str(out),
                "--no-progress", *SMALL, *extra, env=env, check=check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_train_then_sigkill_resume_is_exact(backend, tiny_checkpoint, tmp_path):
    ckpt, prompts = tiny_checkpoint("gpt2"), _prompts(tmp_path)
    full = tmp_path / "full"
    _train(backend, ckpt, prompts, full, "--iterations", "4", "--checkpoint-every", "1")
    ref = _metrics(full)
    assert [r["iteration"] for r in ref] == [0, 1, 2, 3]
    assert (full / "policy" / "config.json").is_file()

    # killed by SIGKILL inside iteration 2's reward computation (the 3rd reward call)
    run = tmp_path / "killed"
    proc = _train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1",
                  env={"PPO_TEST_KILL_AT": "3"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert [r["iteration"] for r in _metrics(run)] == [0, 1]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "iter_00000002"
    # a new run refuses to overwrite it ...
    proc = _train(backend, ckpt, prompts, run, "--iterations", "4", check=False)
    assert proc.returncode == 2 and "pass --resume" in proc.stderr
    # ... --resume continues and reproduces the uninterrupted run exactly
    _train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1", "--resume")
    assert _metrics(run) == ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_checkpoints_and_exits_cleanly(backend, tiny_checkpoint, tmp_path):
    ckpt, prompts = tiny_checkpoint("gpt2"), _prompts(tmp_path)
    run = tmp_path / "run"
    proc = _train(backend, ckpt, prompts, run, "--iterations", "5", "--checkpoint-every", "0",
                  env={"PPO_TEST_KILL_AT": "2", "PPO_TEST_SIGNAL": "TERM"}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM: stopped after iteration 2" in proc.stderr
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "iter_00000002"
    _train(backend, ckpt, prompts, run, "--iterations", "3", "--resume")
    assert [r["iteration"] for r in _metrics(run)] == [0, 1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reward_is_refused(backend, tiny_checkpoint, tmp_path):
    proc = _cli("train", "--backend", backend, "--policy", str(tiny_checkpoint("gpt2")),
                "--reward-fn", "tests.test_trainer:nan_reward", "--prompts", str(_prompts(tmp_path)),
                "--out", str(tmp_path / "r"), "--no-progress", *SMALL, "--iterations", "1", check=False)
    assert proc.returncode == 1
    assert "reward function 'nan_reward' returned non-finite scores (nan) for 1 of 4 samples (first: sample 0)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _trainer(backend, ckpt, **cfg):
    config = PPOConfig(**{**dict(batch_size=4, max_new_tokens=6, max_prompt_len=8, ppo_epochs=2,
                                 num_minibatches=2, learning_rate=1e-3), **cfg})
    if backend == "jax":
        from ppo_jax.ppo import PPOTrainer
    else:
        from ppo_torch.ppo import PPOTrainer
    return PPOTrainer(str(ckpt), length_reward, ["a b", "c d e", "f", "g h"], config=config)


def _poison(trainer):
    """Put a NaN into one policy weight."""
    if trainer.backend == "jax":
        import jax

        leaves, treedef = jax.tree.flatten(trainer.params["policy"])
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(float("nan"))
        trainer.params["policy"] = jax.tree.unflatten(treedef, leaves)
    else:
        import torch

        with torch.no_grad():
            next(trainer.policy.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_updates_are_skipped_then_training_stops(backend, tiny_checkpoint):
    from ppo_rlhf.loop import NonFiniteUpdates
    from ppo_rlhf.rollout import RolloutBatch

    t = _trainer(backend, tiny_checkpoint("gpt2"), max_bad_updates=6)
    t.step()
    batch = t.rollout(*_tokens(t), iteration=1)
    adv = t.compute_advantages({k: v for k, v in batch.arrays().items() if not k.startswith("extra/")}, 0.05)
    before = _flat(t)
    # a NaN advantage on a real token of every row makes every minibatch's loss NaN: all
    # 2 epochs x 2 minibatches are skipped
    adv = {k: np.array(t._to_numpy(v)) for k, v in adv.items()}
    adv["advantages"][:, 0] = np.nan
    stats = t.update({**batch.arrays(), **adv}, iteration=1)
    assert np.asarray(stats["update/skipped"]).all()
    np.testing.assert_array_equal(_flat(t), before)  # params (and optimiser) untouched
    # poisoned weights: iterations keep skipping until max_bad_updates in a row stop training
    _poison(t)
    with pytest.raises(NonFiniteUpdates, match="consecutive PPO updates had a non-finite loss"):
        for _ in range(4):
            t.step()
    assert isinstance(batch, RolloutBatch)


def _tokens(t):
    from ppo_rlhf.loop import tokenize_prompts

    q, qm, _ = tokenize_prompts(t.tokenizer, ["a b", "c d e", "f", "g h"], t.config.max_prompt_len)
    return q, qm


def _flat(t) -> np.ndarray:
    if t.backend == "jax":
        import jax

        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t.params)])
    return np.concatenate([p.detach().numpy().ravel() for p in t._trainable()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_api_ten_lines(backend, tiny_checkpoint, tmp_path):
    """The README's ten-line example, in each backend."""
    ckpt = tiny_checkpoint("llama")
    if backend == "jax":
        from ppo_jax.ppo import PPOTrainer
    else:
        from ppo_torch.ppo import PPOTrainer
    config = PPOConfig(batch_size=4, max_new_tokens=6, max_prompt_len=8, num_iterations=2)
    trainer = PPOTrainer(policy=str(ckpt), reward=length_reward, prompts=["hi there", "a b", "c"],
                         config=config, out_dir=tmp_path / "run")
    history = trainer.train(progress=False)
    trainer.save_policy(tmp_path / "run" / "policy")
    assert len(history) == 2 and all(np.isfinite(h["objective/scores"]) for h in history)
    assert (tmp_path / "run" / "policy" / "tokenizer.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_jax_trainer_compiles_nothing_after_the_first_iteration(tiny_checkpoint):
    from ppo_rlhf.testing import count_jax_compilations

    t = _trainer("jax", tiny_checkpoint("gpt2"), adaptive_kl=True, grad_accum_steps=2)
    with count_jax_compilations() as first:
        t.step()
    assert len(first) >= 3  # generate, rollout forward, advantages, update (+ small eager ops)
    with count_jax_compilations() as later:
        for _ in range(3):
            t.step()
    assert later == [], f"{len(later)} compilations after the first iteration"
