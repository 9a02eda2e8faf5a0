"""Metrics of a training run: the metrics.jsonl writer, reading it back, phase timers.

One JSON object per line and per step (iteration), flushed and fsynced as it is written, so a
crash loses nothing written. On resume the host loop reopens the file keeping only the records
of steps the checkpoint already holds (`MetricsWriter(path, keep=...)`); the steps after it are
redone and written again, so a resumed run's file is the uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np


class MetricsWriter:
    """Appends one JSON object per line, flushed and fsynced. `keep(record)`: which records of an
    existing file survive reopening (default: none -- a fresh log); `kept` holds them, parsed."""

    def __init__(self, path: str | os.PathLike, *, keep: Callable[[dict], bool] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []  # the surviving lines, byte for byte
        if keep is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and _complete_json(l) and keep(json.loads(l))]
        self.kept: list[dict[str, Any]] = [json.loads(l) for l in kept]
        self.path.write_text("".join(l + "\n" for l in kept))
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _complete_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a half-written last line, from a crash, is left out)."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip() and _complete_json(l)]


def jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics dict as strict JSON values: numpy scalars as Python ones, NaN / inf as None."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


@contextmanager
def phase_timer(times: dict[str, float], name: str, block: Any = None) -> Iterator[None]:
    """Accumulate wall time of a block into times[name]; `block()` is called at the end so that
    asynchronous work (JAX dispatch, CUDA kernels) is counted in its own phase."""
    t0 = time.perf_counter()
    yield
    if block is not None:
        block()
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


__all__ = ["MetricsWriter", "read_metrics", "jsonable", "phase_timer"]
