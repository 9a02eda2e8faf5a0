"""Plots of a PPO run from its metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

# (metric key, title, file name)
PANELS = [
    ("objective/scores", "reward-model score", "rm_score.png"),
    ("objective/gold", "gold score (the stand-in for human judgement)", "gold_score.png"),
    ("objective/kl", "KL(policy || reference) per response", "kl.png"),
    ("policy/entropy_avg", "policy entropy per token", "entropy.png"),
]


def plot_metrics(records: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per panel that has data, plus `training.png` with all of them side by side.
    Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [p for p in PANELS if any(p[0] in r for r in records)]
    written = []
    its = [r["iteration"] for r in records]
    for key, title, name in panels:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _draw(ax, its, [r.get(key, float("nan")) for r in records], key, title)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, (key, title, _) in zip(axes[0], panels):
            _draw(ax, its, [r.get(key, float("nan")) for r in records], key, title)
        fig.tight_layout()
        fig.savefig(out_dir / "training.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "training.png")
    return written


def _draw(ax, x, y, key, title) -> None:
    ax.plot(x, y, marker="." if len(x) < 60 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel(key, fontsize=8)
    ax.grid(alpha=0.3)
