"""Checkpoint directories that are never half-written (backend-neutral).

Layout under a run's `checkpoints/`:

    iter_00000010/          one complete checkpoint (what is inside is the backend's business)
        MANIFEST.json       sha256 and size of every file, written last
        trainer_state.json  iteration, KL coefficient, counters, config
        ...
    LATEST                  the name of the newest complete checkpoint

A checkpoint is written into a temporary sibling directory, every file fsynced, the manifest
written, then renamed into place (a rename is atomic on POSIX) and only then is LATEST replaced
(again by an atomic rename). A crash at any moment leaves either the old or the new checkpoint,
never a half-written "latest". On load, a checkpoint whose files don't match its manifest is
reported (a warning naming it and the reason) and the previous complete one is used. Every
failure to use a checkpoint -- incomplete, damaged, unreadable -- is a `CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from ppo_rlhf.data.jsonl import fsync_dir
from ppo_rlhf.errors import CheckpointError
from ppo_rlhf.runtime.processes import SINGLE_PROCESS, Processes

MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
LATEST = "LATEST"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint against its manifest; return its trainer state. Raises CheckpointError."""
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (the checkpoint was never completed)")
    try:
        manifest = json.loads(man_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {e}") from None
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: missing file {rel}")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {rel} does not match its checksum")
    return json.loads((path / STATE).read_text())


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def path_for(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:08d}"

    def save(self, iteration: int, write: Callable[[Path], None], state: dict[str, Any], *,
             processes: Processes = SINGLE_PROCESS) -> Path:
        """Write a checkpoint atomically: `write(tmp_dir)` puts the backend's files in place.
        Several processes (`ppo_rlhf.runtime.processes.Processes`; a shared filesystem): every process
        calls this and runs `write` into the same temporary directory (saving sharded state is
        collective: Orbax, FSDP gathers); the main process does everything else."""
        final = self.path_for(iteration)
        tmp = self.root / f".tmp-{final.name}-{processes.shared_token()}"
        if processes.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        processes.barrier("checkpoint-start")
        write(tmp)
        processes.barrier("checkpoint-written")
        if processes.is_main:
            self._finish(iteration, tmp, final, state)
        processes.barrier("checkpoint-done")
        return final

    def _finish(self, iteration: int, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        """Trainer state, manifest, fsync, rename into place, LATEST, pruning."""
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for name in names:
                f = Path(dirpath) / name
                files[str(f.relative_to(tmp))] = {"sha256": _sha256(f), "size": f.stat().st_size}
        (tmp / MANIFEST).write_text(json.dumps({"iteration": iteration, "files": files}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same iteration: move the old one aside first
            old = self.root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self._prune()

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("iter_*") if p.is_dir())

    def _prune(self) -> None:
        for p in self._complete()[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-*"):  # leftovers of a crash mid-save
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that verifies, and its trainer state; corrupted ones are skipped
        with a warning naming them. None if there is no usable checkpoint."""
        if not self.root.is_dir():
            return None
        candidates = self._complete()[::-1]
        for p in candidates:
            try:
                return p, verify(p)
            except (CheckpointError, OSError, json.JSONDecodeError, KeyError) as e:
                warnings.warn(f"checkpoint {p} is corrupted ({e}); trying the previous one",
                              stacklevel=2)
        if candidates:
            raise CheckpointError(f"every checkpoint under {self.root} is corrupted ("
                                    + ", ".join(p.name for p in candidates) + "): there is nothing "
                                    "to resume from; pass another --out to start afresh")
        return None
