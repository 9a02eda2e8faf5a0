"""The `arithmetic` task: a verifiable (exact-match) reward, its prompts, corpus, tokenizer, and
the demo's verifiable path (RL on the checker, no reward model) end to end in each backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ppo_rlhf.tasks.arithmetic as A
from ppo_rlhf.tasks import Task, get_task, task_names

ROOT = Path(__file__).resolve().parents[1]


# ---- the reward ----------------------------------------------------------------------------

def test_reward_is_exact_match():
    cases = [("3+4=", "7", 1.0), ("8+9=", "17", 1.0), ("0+0=", "0", 1.0), ("9+9=", "18", 1.0),
             ("3+4=", " 7 ", 1.0),    # surrounding whitespace is ignored
             ("3+4=", "7\n", 1.0),
             ("3+4=", "8", 0.0),      # wrong
             ("3+4=", "", 0.0),       # missing
             ("3+4=", "  ", 0.0),
             ("3+4=", "07", 0.0),     # leading zero: not the exact answer
             ("3+4=", "77", 0.0),     # the answer as a prefix is not a match
             ("8+9=", "1", 0.0),     # nor is a prefix of the answer
             ("3+4=", "7+1", 0.0),    # garbled / trailing text
             ("3+4=", "7 7", 0.0),
             ("3+4=", "7=", 0.0),
             ("3+4=", "+7", 0.0),
             ("3+4=", "7.0", 0.0),
             ("3+4=", "seven", 0.0)]
    got = A.gold_reward([p for p, _, _ in cases], [r for _, r, _ in cases])
    assert got == [want for _, _, want in cases], [c for c, g in zip(cases, got) if g != c[2]]
    assert all(isinstance(g, float) for g in got)


def test_reward_checks_every_prompt_and_refuses_bad_input():
    prompts = A.all_prompts()
    answers = [str(int(p[:-1].split("+")[0]) + int(p[:-1].split("+")[1])) for p in prompts]
    assert A.gold_reward(prompts, answers) == [1.0] * len(prompts)
    assert A.gold_reward(prompts, [str(int(a) + 1) for a in answers]) == [0.0] * len(prompts)
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        A.gold_reward(["review of the phone:"], ["7"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        A.gold_reward(["1+1=", "1+2="], ["2"])


def test_well_formed_is_a_number_right_or_wrong():
    assert A.well_formed("3+4=", "7") and A.well_formed("3+4=", "8") and A.well_formed("0+0=", "0")
    assert not any(A.well_formed("3+4=", r) for r in ("", "07", "7+", "7 7", "x"))


# ---- prompts, corpus ------------------------------------------------------------------------

def test_prompts_split_disjoint_and_fixed():
    train, ev = A.train_prompts(), A.eval_prompts()
    assert len(train) == 75 and len(ev) == 25 and not set(train) & set(ev)
    assert sorted(train + ev) == sorted(A.all_prompts()) and len(set(A.all_prompts())) == 100
    assert (train, ev) == (A.train_prompts(), A.eval_prompts())
    assert max(len(p) for p in A.all_prompts()) <= A.MAX_PROMPT_TOKENS


def test_corpus_is_seeded_noisy_and_extends():
    a, b = A.generate_corpus(3000, seed=1), A.generate_corpus(3000, seed=1)
    assert a == b and a != A.generate_corpus(3000, seed=2)
    assert A.generate_corpus(500, seed=1) == a[:500]
    acc = np.mean(A.gold_reward([p for p, _ in a], [r for _, r in a]))
    assert abs(acc - (1 - A.CORPUS_NOISE)) < 0.03  # room for RL to improve
    assert all(A.well_formed(p, r) for p, r in a)   # wrong answers are still numbers
    clean = A.generate_corpus(200, seed=1, noise=0.0)
    assert A.gold_reward([p for p, _ in clean], [r for _, r in clean]) == [1.0] * 200
    # the right answer is each prompt's most frequent one (a model of the corpus prefers it)
    by_prompt: dict[str, dict[str, int]] = {}
    for p, r in A.generate_corpus(40000, seed=3):
        by_prompt.setdefault(p, {}).setdefault(r, 0)
        by_prompt[p][r] += 1
    wins = np.mean([max(c, key=c.get) == A.answer(p) for p, c in by_prompt.items()])
    assert wins > 0.97


def test_preference_data_is_labelled_by_the_checker():
    pairs = A.preference_data(200, seed=0)
    assert len(pairs.records) == 200
    assert pairs.records == A.preference_data(200, seed=0).records


# ---- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_round_trips(tmp_path):
    pytest.importorskip("transformers")
    from ppo_rlhf.tokens import load_tokenizer

    tok = A.build_tokenizer(tmp_path)
    assert tok.get_vocab_size() == 16
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    hf = load_tokenizer(tmp_path)
    assert (hf.pad_token_id, hf.eos_token_id) == (0, 2)
    for p, r in A.generate_corpus(300, seed=0):
        ids_p = hf(p, add_special_tokens=False)["input_ids"]
        ids_r = hf(r, add_special_tokens=False)["input_ids"]
        assert hf(f"{p} {r}", add_special_tokens=False)["input_ids"] == ids_p + ids_r
        assert len(ids_p) == len(p) and len(ids_r) == len(r) and 3 not in ids_p + ids_r
        assert hf.decode(ids_p) == p and hf.decode(ids_r + [2], skip_special_tokens=True) == r
    assert hf("3+x", add_special_tokens=False)["input_ids"][-1] == 3  # unknown character: <unk>
    A.build_tokenizer(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_task_registered_and_complete():
    task = get_task("arithmetic")
    assert isinstance(task, Task) and task is A.TASK and "arithmetic" in task_names()
    assert task.verifiable and not get_task("reviews").verifiable
    assert task.gold_range == (0.0, 1.0) and task.well_formed is A.well_formed
    cfg = task.demo_model_config("tiny")
    assert cfg["vocab_size"] == 16 and cfg["n_positions"] >= task.max_prompt_tokens + task.max_response_tokens


def test_demo_config_for_the_task_and_the_estimator_flag():
    from ppo_rlhf.app.demo import DemoConfig
    from ppo_rlhf.errors import UsageError

    assert DemoConfig.for_task("reviews") == DemoConfig() and DemoConfig.for_task("reviews", quick=True) == \
        DemoConfig.quick()
    c = DemoConfig.for_task("arithmetic")
    assert c.task == "arithmetic" and c.ppo["max_new_tokens"] == A.MAX_RESPONSE_TOKENS
    g = c.with_estimator("grpo")
    assert (g.ppo["advantage_estimator"], g.ppo["num_generations"]) == ("grpo", 4)
    assert g.ppo["batch_size"] * 4 == c.ppo["batch_size"]  # same responses per iteration
    assert c.with_estimator("gae").ppo["num_generations"] == 1
    assert c.with_estimator("rloo", 8).ppo["batch_size"] == c.ppo["batch_size"] // 8
    with pytest.raises(UsageError, match="--estimator 'nope'"):
        c.with_estimator("nope")
    with pytest.raises(UsageError, match="must divide"):
        c.with_estimator("grpo", 5)


# ---- the demo on the task, end to end --------------------------------------------------------

def _demo(backend: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppo_rlhf", "demo", "--task", "arithmetic", "--quick",
                           "--backend", backend, "--out", str(out), "--no-progress", *extra],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_demo_on_the_verifiable_task(backend, tmp_path):
    out = tmp_path / "demo"
    proc = _demo(backend, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr and "verifiable" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["advantage_estimator"] == "gae"
    for key in ("accuracy_before", "accuracy_after", "kl_to_ref", "wall_seconds"):
        assert isinstance(summary[key], float), key
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    for f in ("samples_before.jsonl", "samples_after.jsonl", "report.md", "ppo/metrics.jsonl",
              "ppo/policy/config.json", "sft/config.json"):
        assert (out / f).is_file(), f
    assert not (out / "reward_model").exists() and not (out / "feedback.jsonl").exists()
    assert "verifiable reward" in (out / "report.md").read_text()
    metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == summary["ppo_iterations"] and "objective/gold" in metrics[0]
    # the estimator flag reaches PPOConfig; --pretrained starts from the first run's model
    out2 = tmp_path / "grpo"
    proc = _demo(backend, out2, "--estimator", "grpo", "--ppo-iterations", "1", "--pretrained", str(out / "sft"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not pretrained again" in proc.stderr and not (out2 / "sft").exists()
    cfg = json.loads((out2 / "ppo" / "config.json").read_text())
    assert (cfg["advantage_estimator"], cfg["num_generations"]) == ("grpo", 4)
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["accuracy_before"] == summary["accuracy_before"]  # the same model, the same eval samples
