"""`ppo-rlhf eval` and `ppo_rlhf.eval.policy`: the numbers it reports, in both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppo_rlhf.eval.policy import SampledScores, summarize, win_rate

ROOT = Path(__file__).resolve().parents[1]


def test_win_rate_counts_ties_half():
    assert win_rate(np.array([1.0, 0.0, 2.0, 5.0]), np.array([0.0, 0.0, 3.0, 1.0])) == pytest.approx(0.625)


def test_summarize_kl_gold_and_records():
    s = SampledScores(prompts=["p", "q"], responses=["a", "bb"], logprobs_sum=np.array([-1.0, -2.0]),
                      ref_logprobs_sum=np.array([-1.5, -2.0]), response_len=np.array([2, 3]),
                      contains_eos=np.array([True, False]), rm_scores=np.array([0.5, 1.5]),
                      ref_responses=["c", "d"], ref_rm_scores=np.array([1.0, 1.0]))
    result, records = summarize(s, gold=lambda p, r: [len(x) for x in r])
    assert result.kl_to_ref == pytest.approx(0.25)  # mean of (log pi - log pi_ref) per response
    assert result.gold_score == 1.5 and result.ref_gold_score == 1.0
    assert result.win_rate == 0.5 and result.rm_score == 1.0 and result.eos_frac == 0.5
    assert records[1] == {"prompt": "q", "response": "bb", "kl": 0.0, "rm_score": 1.5, "gold_score": 2.0,
                          "reference_response": "d", "reference_rm_score": 1.0}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_eval_policy_against_itself(backend, tiny_checkpoint, tmp_path):
    """Policy == reference: the KL of its samples is exactly 0; every number is reported."""
    ckpt = tiny_checkpoint("gpt2")
    rm = tiny_checkpoint("gpt2", kind="scalar", seed=3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick\nbrown fox\na good answer\n")
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "ppo_rlhf", "eval", "--backend", backend,
                           "--policy", str(ckpt), "--reference", str(ckpt), "--reward-model", str(rm),
                           "--prompts", str(prompts), "--max-new-tokens", "8", "--max-prompt-len", "8",
                           "--batch-size", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 3 and result["kl_to_ref"] == 0.0
    assert 0.0 <= result["win_rate"] <= 1.0 and isinstance(result["rm_score"], float)
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["the quick", "brown fox", "a good answer"]
    assert all("reference_response" in s and "rm_score" in s for s in samples)
