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
@pytest.mark.parametrize("backend,lora_rank", [("jax", 4), ("torch", None)])
def test_demo_quick_writes_every_artifact(backend, lora_rank, tmp_path):
    """(CI time: one backend runs the demo with LoRA on the policy, the other without; both
    paths of each core's trainer are covered by the trainer and LoRA tests.)"""
    out = tmp_path / "demo"
    lora = ["--lora-rank", str(lora_rank)] if lora_rank else []
    proc = subprocess.run([sys.executable, "-m", "ppo_rlhf", "demo", "--quick", "--backend", backend,
                           "--out", str(out), "--no-progress", *lora], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("gold_score_before", "gold_score_after", "rm_score_before", "rm_score_after",
                "kl_to_ref", "wall_seconds"):
        assert isinstance(summary[key], float), key
    for f in ("feedback.jsonl", "samples_before.jsonl", "samples_after.jsonl", "report.md",
              "ppo/metrics.jsonl", "ppo/config.json",
              "ppo/policy/adapter_config.json" if lora_rank else "ppo/policy/config.json",
              "reward_model/config.json", "sft/config.json", "plots/gold_score.png",
              "plots/rm_score.png", "plots/kl.png", "plots/entropy.png"):
        assert (out / f).is_file(), f
    assert (out / "ppo" / "checkpoints" / "LATEST").is_file()
    # with --lora-rank the policy is a PEFT adapter on the pretrained model, evaluated as such
    assert (out / "ppo" / "policy" / "adapter_config.json").is_file() == bool(lora_rank)
    assert summary["lora_rank"] == (lora_rank or 0)
    assert ("LoRA adapters" in (out / "report.md").read_text()) == bool(lora_rank)
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


def test_demo_lora_options():
    """`ppo-rlhf demo --lora-rank R`: LoRA on the policy only, alpha 2R, every projection of the
    demo's GPT-2, PPO's learning rate LORA_LR_FACTOR x the full fine-tune's unless given; bad
    values are one-line errors before any work."""
    from ppo_rlhf.app.demo import LORA_LR_FACTOR, DemoConfig
    from ppo_rlhf.config import PPOConfig

    base = DemoConfig()
    c = base.with_lora(8)
    cfg = PPOConfig(**c.ppo)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_roles) == (8, 16.0, ("policy",))
    assert set(cfg.lora_targets) == {"q", "k", "v", "o", "up", "down"}
    assert cfg.learning_rate == pytest.approx(base.ppo["learning_rate"] * LORA_LR_FACTOR)
    c = base.with_lora(4, alpha=4, targets="q,v", learning_rate=1e-3)
    cfg = PPOConfig(**c.ppo)
    assert (cfg.lora_alpha, cfg.lora_targets, cfg.learning_rate) == (4.0, ("q", "v"), 1e-3)
    assert base.ppo.get("lora_rank", 0) == 0  # the default demo: a full fine-tune
    for bad, msg in ((["--lora-rank", "-1"], "lora_rank"), (["--lora-alpha", "4"], "need --lora-rank"),
                     (["--lora-rank", "4", "--lora-targets", "q,nope"], "nope")):
        proc = subprocess.run([sys.executable, "-m", "ppo_rlhf", "demo", "--quick", "--out", "/nonexistent/x",
                               *bad], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, (bad, proc.stderr[-2000:])
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)
