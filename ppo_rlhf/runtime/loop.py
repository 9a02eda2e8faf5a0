"""The ONE host loop that PPO, reward-model and SFT training all run through.

    class MyTrainer:                           # the trainers: runtime/ppo.py, runtime/supervised.py
        def __init__(self, ...):
            self.loop = HostLoop(self, counter="step", out_dir=..., checkpoint_every=...,
                                 keep_checkpoints=...)
        def save_checkpoint(self, path): ...   # the backend's tensors (ppo_{jax,torch}/checkpoint.py)
        def load_checkpoint(self, path): ...
        def extra_state(self): ...             # counters of its own, and restore_extra_state

    stopped = trainer.loop.run(total, one_step, resume=True, desc="SFT (jax)")

A trainer owns its loop (`Trained`: what the loop asks of it) and supplies its step (a function
that does one unit of work, advances `loop.position` and returns that step's metrics record) and
its state (`save_checkpoint` / `load_checkpoint`, plus `extra_state` for counters of its own);
the loop does everything else, the same way for all:

* progress bar (main process only) with the step's headline numbers;
* metrics: one line per step in out_dir/metrics.jsonl, fsynced (`runtime/metrics.py`), and with
  report_to="tensorboard" the same numbers as TensorBoard scalars (`runtime/tracking.py`);
* checkpoints: every `checkpoint_every` steps, at the end and when stopped, atomic and
  checksummed, the newest `keep_checkpoints` kept (`runtime/checkpoints.py`);
* resume: the newest valid checkpoint (a damaged one is reported and the previous one used), the
  metrics after it dropped -- data order and sampling are functions of (seed, position)
  (`runtime/seeds.py`), so the resumed run repeats the uninterrupted one exactly;
* SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the loop returns
  (a second signal stops at once);
* non-finite updates: a step whose loss or gradient is not finite is skipped by the backend; the
  loop counts them and stops after `config.max_bad_updates` in a row (`NonFiniteUpdates`);
* several processes (`runtime/processes.py`): only the main one writes; all agree on stopping.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ppo_rlhf.errors import NonFiniteUpdates, UsageError
from ppo_rlhf.runtime.checkpoints import CheckpointManager
from ppo_rlhf.runtime.metrics import MetricsWriter
from ppo_rlhf.runtime.processes import Processes
from ppo_rlhf.runtime.tracking import make_tracker


class StopRequested:
    """SIGTERM / SIGINT set a flag instead of killing the process, so the loop can finish its
    step, write a checkpoint and return. A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class BadUpdateCounter:
    """Counts consecutive skipped (non-finite) optimiser steps across steps / iterations and raises
    `NonFiniteUpdates` at `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = int(limit), 0, 0

    def record(self, skipped: Sequence[bool], where: str) -> None:
        for s in skipped:
            if not s:
                self.consecutive = 0
                continue
            self.consecutive += 1
            self.total += 1
            if self.consecutive >= self.limit:
                raise NonFiniteUpdates(
                    f"{where}: {self.consecutive} consecutive optimiser updates had a non-finite "
                    f"loss or gradient (NaN/inf); stopping. Skipped updates change nothing, so the "
                    f"newest checkpoint is intact: fix the cause (e.g. a lower learning rate, the "
                    f"reward's scale) and continue with --resume")


class Trained(Protocol):
    """What a trainer gives the loop it owns."""

    backend: str
    config: Any
    out_dir: Path | None
    processes: Processes  # several processes (a multi-host mesh, torchrun): only the main one writes

    def save_checkpoint(self, path: Path) -> None: ...
    def load_checkpoint(self, path: Path) -> None: ...
    def extra_state(self) -> dict[str, Any]: ...
    def restore_extra_state(self, state: dict[str, Any]) -> None: ...


class LoopCounter:
    """A trainer's progress counter (PPO's `iteration`, the supervised trainers' `step`) as an
    attribute of the trainer that reads and sets its loop's `position`."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __get__(self, trainer: Any, owner: type | None = None) -> Any:
        return self if trainer is None else trainer.loop.position

    def __set__(self, trainer: Any, value: int) -> None:
        trainer.loop.position = int(value)


class HostLoop:
    """A trainer's loop: see the module docstring. `counter` names the progress counter (the
    metrics key and the checkpoint's; PPO "iteration", the supervised trainers "step");
    `counter_offset`: records carry counter + offset = the number of steps done when written
    (PPO's "iteration" is the 0-based index of the iteration a record describes, offset 1; "step"
    counts steps done, offset 0); `config_file`: where out_dir gets the config."""

    def __init__(self, trainer: Trained, *, counter: str = "step", counter_offset: int = 0,
                 config_file: str = "train_config.json", checkpoint_every: int, keep_checkpoints: int):
        if isinstance(checkpoint_every, bool) or int(checkpoint_every) < 0:
            raise UsageError(f"checkpoint_every must be an integer >= 0 (0 = only at the end), "
                             f"got {checkpoint_every!r}")
        self.trainer = trainer
        self.counter, self.counter_offset, self.config_file = counter, int(counter_offset), config_file
        self.checkpoint_every = int(checkpoint_every)
        self.keep_checkpoints = int(keep_checkpoints)
        self.bad_updates = BadUpdateCounter(trainer.config.max_bad_updates)
        self.position = 0
        """Steps (iterations) finished: the trainer's counter."""
        self.records: list[dict[str, Any]] = []
        """Every step's record of the run (after `run`; on a resume, from metrics.jsonl too)."""

    @property
    def out_dir(self) -> Path | None:
        return self.trainer.out_dir

    @property
    def processes(self) -> Processes:
        return self.trainer.processes

    @property
    def checkpoints(self) -> CheckpointManager | None:
        return None if self.out_dir is None else CheckpointManager(self.out_dir / "checkpoints",
                                                                   keep=self.keep_checkpoints)

    def loop_state(self) -> dict[str, Any]:
        t = self.trainer
        return {self.counter: self.position, "backend": t.backend,
                "bad_updates_consecutive": self.bad_updates.consecutive,
                "bad_updates_total": self.bad_updates.total, "config": t.config.to_dict(),
                **t.extra_state()}

    def restore_loop_state(self, state: dict[str, Any]) -> None:
        if state.get("backend") not in (None, self.trainer.backend):
            raise UsageError(f"checkpoint was written by the {state['backend']} backend; resume it "
                             f"with --backend {state['backend']}")
        self.position = int(state[self.counter])
        self.bad_updates.consecutive = int(state.get("bad_updates_consecutive", 0))
        self.bad_updates.total = int(state.get("bad_updates_total", 0))
        self.trainer.restore_extra_state(state)

    def write_checkpoint(self) -> Path:
        if self.checkpoints is None:
            raise ValueError("write_checkpoint needs out_dir")
        return self.checkpoints.save(self.position, self.trainer.save_checkpoint, self.loop_state(),
                                     processes=self.processes)

    def resume(self) -> bool:
        """Load the newest valid checkpoint of out_dir (if any). Returns whether one was found."""
        found = None if self.checkpoints is None else self.checkpoints.latest()
        if found is None:
            return False
        path, state = found
        self.trainer.load_checkpoint(path)
        self.restore_loop_state(state)
        return True

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, total: int, step: Callable[[], dict[str, Any]], *, resume: bool = False,
                 progress: bool = True, desc: str = "training", report_to: str = "none",
                 postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Run `step()` until `total` steps are done in all (see the module docstring). Returns
        True when a signal stopped the loop early (a checkpoint was written), else False."""
        if resume:
            self.resume()
        writer, main = None, self.processes.is_main
        tracker = make_tracker(report_to if main else "none", self.out_dir)
        if self.out_dir is not None and main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / self.config_file).write_text(self.trainer.config.to_json() + "\n")
            done = self.position
            key, offset = self.counter, self.counter_offset
            writer = MetricsWriter(self.out_dir / "metrics.jsonl",
                                   keep=lambda r: r.get(key, 10**12) + offset <= done)
        # every record of the run so far: those kept from before a resume, then this call's
        self.records = list(writer.kept) if writer is not None else []
        bar = progress_bar(total, self.position, progress and main, desc)
        stopped = False
        try:
            with StopRequested() as stop:
                while self.position < total:
                    record = step()
                    self.records.append(record)
                    if writer is not None:
                        writer.write(record)
                    tracker.log(record, self.position)
                    if on_record is not None:
                        on_record(record)
                    bar.update(1)
                    if postfix is not None:
                        bar.set_postfix(postfix(record), refresh=False)
                    every = self.checkpoint_every
                    stopped = self.processes.any(stop.requested is not None)  # all agree
                    if self.out_dir is not None and ((every and self.position % every == 0)
                                                     or stopped or self.position == total):
                        self.write_checkpoint()
                    if stopped:
                        if main:
                            print(f"\n{stop.requested or 'a stop request'}: stopped after "
                                  f"{self.counter} {self.position}; checkpoint written, resume with "
                                  f"--resume", file=sys.stderr)
                        break
        finally:
            bar.close()
            tracker.close()
            if writer is not None:
                writer.close()
        return stopped


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (or a silent stand-in when disabled)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)


def fmt(x: Any) -> str:
    """A number for a progress bar's postfix (NaN / None as "nan")."""
    return "nan" if x is None or (isinstance(x, float) and x != x) else f"{x:.4f}"


__all__ = ["HostLoop", "Trained", "LoopCounter", "StopRequested", "BadUpdateCounter", "progress_bar", "fmt"]
