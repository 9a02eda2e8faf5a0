"""`ppo-rlhf demo --quick` runs all six steps end to end in each backend (the README's first
command runs the same code with the full sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_demo_quick_writes_every_artifact(backend, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ppo_rlhf", "demo", "--quick", "--backend", backend,
                           "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("gold_score_before", "gold_score_after", "rm_score_before", "rm_score_after",
                "kl_to_ref", "wall_seconds"):
        assert isinstance(summary[key], float), key
    for f in ("feedback.jsonl", "samples_before.jsonl", "samples_after.jsonl", "report.md",
              "ppo/metrics.jsonl", "ppo/config.json", "ppo/policy/config.json",
              "reward_model/config.json", "sft/config.json", "plots/gold_score.png",
              "plots/rm_score.png", "plots/kl.png", "plots/entropy.png"):
        assert (out / f).is_file(), f
    assert (out / "ppo" / "checkpoints" / "LATEST").is_file()
    # the supervised stages ran with the backend's remat policy (DemoConfig.supervised_remat)
    from ppo_rlhf.app.demo import DemoConfig

    want = DemoConfig().supervised_remat[backend]
    for stage in ("sft", "reward_model"):
        assert json.loads((out / stage / "train_config.json").read_text())["remat"] == want, stage
    metrics = [json.loads(l) for l in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == summary["ppo_iterations"] and "objective/gold" in metrics[0]
    # a second run into the same directory is refused instead of mixing runs
    again = subprocess.run([sys.executable, "-m", "ppo_rlhf", "demo", "--quick", "--backend", backend,
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert again.returncode == 2 and "holds a finished demo run" in again.stderr
