"""The PPO trainers on a tiny checkpoint, in both backends: the Python API of the README and no
recompilation after the first iteration. The CLI runs, crashes, signals, NaN rewards and
non-finite updates are in the fault suite, tests/test_faults.py."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import PPOConfig
from tests.helpers import length_reward, make_trainer

BACKENDS = ["jax", "torch"]


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

    t = make_trainer("jax", tiny_checkpoint("gpt2"), adaptive_kl=True, grad_accum_steps=2)
    with count_jax_compilations() as first:
        t.step()
    assert len(first) >= 3  # generate, rollout forward, advantages, update (+ small eager ops)
    with count_jax_compilations() as later:
        for _ in range(3):
            t.step()
    assert later == [], f"{len(later)} compilations after the first iteration"
