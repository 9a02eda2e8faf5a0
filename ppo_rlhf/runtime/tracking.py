"""Run tracking: every metrics record of a run, also as TensorBoard scalars, live.

    ppo-rlhf train ... --report-to tensorboard        # then: tensorboard --logdir OUT/tensorboard

`report_to="tensorboard"` makes the host loop (`runtime/loop.py`) write each record's numbers --
the same keys as metrics.jsonl, TRL's names for PPO (`objective/kl`, `policy/clipfrac_avg`, ...)
-- to an event file under out_dir/tensorboard, at the record's step (PPO: the iteration; reward
model and SFT: the optimiser step). tensorboardX writes it (no TensorFlow; `pip install
'ppo-rlhf[tracking]'`); the event file is flushed after every record, so a crash loses nothing
written, and a resumed run appends to the same directory (TensorBoard shows the newest value of
a step that was done twice). `report_to="none"` (the default) writes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ppo_rlhf.errors import UsageError

REPORT_TO = ("none", "tensorboard")


class _NoTracker:
    def log(self, record: Mapping[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars to out_dir/tensorboard (tensorboardX's SummaryWriter)."""

    def __init__(self, logdir: str | Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UsageError("--report-to tensorboard needs tensorboardX: pip install "
                             "'ppo-rlhf[tracking]' (or: pip install tensorboardX)") from None
        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=1)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # counters stay scalars; flags, strings, NaN / None are not plotted
            self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(report_to: str, out_dir: Path | None) -> Any:
    """The tracker `report_to` asks for (UsageError for an unknown one, or for tensorboard
    without an out_dir to write into)."""
    if report_to not in REPORT_TO:
        raise UsageError(f"report_to={report_to!r} is invalid: allowed {', '.join(REPORT_TO)}")
    if report_to == "none":
        return _NoTracker()
    if out_dir is None:
        raise UsageError("report_to='tensorboard' needs an out_dir to write the event files into")
    return TensorBoardTracker(Path(out_dir) / "tensorboard")


__all__ = ["REPORT_TO", "make_tracker", "TensorBoardTracker"]
