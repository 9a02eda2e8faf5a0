"""The annotation database: one SQLite file in WAL mode.

Durability: the connection runs with `journal_mode=WAL` and `synchronous=FULL`, so a commit
returns only after its WAL frames are fsynced -- an answer survives SIGKILL of the server (which
loses nothing that reached the OS anyway) and a power cut. The server acknowledges an answer only
after its transaction committed. Each write is one `BEGIN IMMEDIATE` transaction (the check that
an annotator has not answered, the insert, and the release of their reservation together), so two
server threads -- or two processes on the same file -- cannot interleave inside one; within a
process one lock guards the single connection.

Schema (version 1):

  meta(key TEXT PRIMARY KEY, value TEXT)
      schema_version "1"; mode "choose"|"rank"|"rate"; k; scale (ratings 1..scale);
      salt (hex: seeds each annotator's response order, see answers.shown_order); created (UNIX s)
  items(id INTEGER PRIMARY KEY, prompt TEXT UNIQUE, responses TEXT)
      one per prompt; responses: a JSON array of the K response texts in the source's order --
      the ORIGINAL order, which stored answers index
  answers(id INTEGER PRIMARY KEY, item_id -> items.id, annotator TEXT, skipped INTEGER 0|1,
          value TEXT, shown TEXT, time REAL, UNIQUE(item_id, annotator))
      value: the answer as JSON in original indices (answers.to_original), NULL when skipped;
      shown: JSON of the order the annotator saw (shown[j] = original index at position j);
      time: UNIX seconds of the commit. One answer per (item, annotator), ever.
  reservations(item_id -> items.id, annotator TEXT, expires REAL, PRIMARY KEY(item_id, annotator))
      the item an annotator was last given and has not answered yet; it counts towards the item's
      `per_item` quota until `expires`, so two annotators are not handed the same last slot.

Assignment (`next_item`): an annotator gets again their live reservation if they have one (a
reload, a restarted server), else the first item (by id) that they have not answered and whose
non-skipped answers plus other annotators' live reservations number fewer than `per_item`. Skips
do not count towards `per_item`; a skipped item is not offered to the same annotator again.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ppo_rlhf.data.jsonl import fsync_dir
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.annotate.answers import Answer, AnswerError, shown_order, to_original

__all__ = ["Store", "Item", "StoredAnswer", "SCHEMA_VERSION"]

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL UNIQUE, responses TEXT NOT NULL);
CREATE TABLE answers (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    skipped INTEGER NOT NULL CHECK (skipped IN (0, 1)),
    value TEXT,
    shown TEXT NOT NULL,
    time REAL NOT NULL,
    UNIQUE (item_id, annotator)
);
CREATE INDEX answers_by_annotator ON answers (annotator);
CREATE TABLE reservations (
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
"""


@dataclass(frozen=True)
class Item:
    """An item as one annotator sees it: `order[j]` is the original index of shown response j."""

    id: int
    prompt: str
    responses: tuple[str, ...]  # original order
    order: tuple[int, ...]

    @property
    def shown(self) -> list[str]:
        return [self.responses[i] for i in self.order]


@dataclass(frozen=True)
class StoredAnswer:
    item_id: int
    annotator: str
    skipped: bool
    value: Any  # original indices (answers.to_original); None when skipped
    time: float


class Store:
    """The database of one annotation project. Thread-safe (one connection behind a lock).

    `Store.create(path, mode=, k=, scale=)` makes a new file; `Store(path)` opens an existing one
    (UsageError if it is missing or not an annotation database)."""

    def __init__(self, path: str | os.PathLike[str], *, _create: dict[str, Any] | None = None):
        self.path = Path(path)
        if _create is None and not self.path.is_file():
            raise UsageError(f"{self.path}: no such annotation database")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise UsageError(f"{self.path}: not an SQLite database ({e})") from None
        if mode.lower() != "wal":
            raise UsageError(f"{self.path}: cannot switch to WAL mode (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if _create is not None:
            self._create(**_create)
        self.meta = self._read_meta()
        self.mode: str = self.meta["mode"]
        self.k = int(self.meta["k"])
        self.scale = int(self.meta["scale"])
        self._salt = self.meta["salt"]

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, mode: str, k: int, scale: int,
               salt: str | None = None) -> "Store":
        """A new database (`salt`: of the shown orders; default: random)."""
        path = Path(path)
        if path.exists():
            raise UsageError(f"{path} already exists")
        if not path.parent.is_dir():
            raise UsageError(f"the directory of --db {path} does not exist")
        salt = secrets.token_hex(8) if salt is None else salt
        store = cls(path, _create=dict(mode=mode, k=k, scale=scale, salt=salt))
        fsync_dir(path.parent)  # the new file's name survives a crash too
        return store

    def _create(self, *, mode: str, k: int, scale: int, salt: str) -> None:
        meta = {"schema_version": SCHEMA_VERSION, "mode": mode, "k": str(k), "scale": str(scale),
                "salt": salt, "created": repr(time.time())}
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())

    def _read_meta(self) -> dict[str, str]:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError:
            raise UsageError(f"{self.path}: not an annotation database (no meta table)") from None
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise UsageError(f"{self.path}: annotation database schema "
                             f"{meta.get('schema_version')!r}; this version reads "
                             f"{SCHEMA_VERSION!r}")
        return meta

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transactions ------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
            return self.db

        def __exit__(self, exc_type: Any, *exc: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self._db)

    # ---- items -------------------------------------------------------------------------------
    def prompts(self) -> set[str]:
        with self._lock:
            return {p for (p,) in self._db.execute("SELECT prompt FROM items")}

    def add_items(self, items: Iterable[tuple[str, Sequence[str]]]) -> int:
        """Add (prompt, responses) items whose prompt is new, in one transaction; returns how
        many were added. Each must have exactly K responses."""
        rows = []
        for prompt, responses in items:
            if len(responses) != self.k:
                raise ValueError(f"item {prompt!r:.60} has {len(responses)} responses, "
                                 f"not {self.k}")
            rows.append((prompt, json.dumps(list(responses), ensure_ascii=False)))
        with self._lock, self._tx() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO items (prompt, responses) VALUES (?, ?)", rows)
            return db.total_changes - before

    def num_items(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def items(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        """id -> (prompt, responses in original order)."""
        with self._lock:
            return {i: (p, tuple(json.loads(r)))
                    for i, p, r in self._db.execute("SELECT id, prompt, responses FROM items")}

    def _item(self, item_id: int, annotator: str) -> Item | None:
        row = self._db.execute("SELECT prompt, responses FROM items WHERE id = ?",
                               (item_id,)).fetchone()
        if row is None:
            return None
        order = shown_order(self._salt, item_id, annotator, self.k)
        return Item(item_id, row[0], tuple(json.loads(row[1])), tuple(order))

    # ---- assignment --------------------------------------------------------------------------
    def next_item(self, annotator: str, *, per_item: int, reserve_s: float,
                  now: float | None = None) -> Item | None:
        """The item `annotator` should answer next (reserved for them for `reserve_s` seconds),
        or None when nothing is left for them. See the module docstring."""
        now = time.time() if now is None else now
        with self._lock, self._tx() as db:
            db.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
            row = db.execute(
                "SELECT item_id FROM reservations r WHERE annotator = ? AND NOT EXISTS "
                "(SELECT 1 FROM answers a WHERE a.item_id = r.item_id AND a.annotator = ?) "
                "ORDER BY item_id LIMIT 1", (annotator, annotator)).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT id FROM items i WHERE NOT EXISTS "
                    "  (SELECT 1 FROM answers a WHERE a.item_id = i.id AND a.annotator = ?) "
                    "AND (SELECT COUNT(*) FROM answers a WHERE a.item_id = i.id AND NOT a.skipped)"
                    "  + (SELECT COUNT(*) FROM reservations r WHERE r.item_id = i.id"
                    "     AND r.annotator != ?) < ? "
                    "ORDER BY id LIMIT 1", (annotator, annotator, per_item)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM reservations WHERE annotator = ?", (annotator,))
            db.execute("INSERT INTO reservations VALUES (?, ?, ?)",
                       (row[0], annotator, now + reserve_s))
            return self._item(row[0], annotator)

    def progress(self, annotator: str, *, per_item: int) -> dict[str, int]:
        """{"done": items this annotator answered or skipped, "total": done + the items still
        open to them (not answered by them, fewer than `per_item` answers)}."""
        with self._lock:
            done = self._db.execute("SELECT COUNT(*) FROM answers WHERE annotator = ?",
                                    (annotator,)).fetchone()[0]
            open_ = self._db.execute(
                "SELECT COUNT(*) FROM items i WHERE NOT EXISTS "
                "  (SELECT 1 FROM answers a WHERE a.item_id = i.id AND a.annotator = ?) "
                "AND (SELECT COUNT(*) FROM answers a WHERE a.item_id = i.id AND NOT a.skipped) < ?",
                (annotator, per_item)).fetchone()[0]
        return {"done": done, "total": done + open_}

    # ---- answers -----------------------------------------------------------------------------
    def record(self, item_id: int, annotator: str, answer: Answer,
               now: float | None = None) -> None:
        """Store `annotator`'s answer to item `item_id` (in shown indices; mapped back to the
        original ones here) and release their reservation, in one committed transaction.
        Raises `AnswerError` (nothing stored) for an unknown item or a second answer."""
        now = time.time() if now is None else now
        with self._lock, self._tx() as db:
            item = self._item(item_id, annotator)
            if item is None:
                raise AnswerError(f"unknown item {item_id}")
            if db.execute("SELECT 1 FROM answers WHERE item_id = ? AND annotator = ?",
                          (item_id, annotator)).fetchone():
                raise AnswerError(f"{annotator} has already answered item {item_id}")
            value = None if answer.skipped else json.dumps(
                to_original(self.mode, answer.value, list(item.order)))
            db.execute("INSERT INTO answers (item_id, annotator, skipped, value, shown, time) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (item_id, annotator, int(answer.skipped), value,
                        json.dumps(list(item.order)), now))
            db.execute("DELETE FROM reservations WHERE item_id = ? AND annotator = ?",
                       (item_id, annotator))

    def answers(self) -> Iterator[StoredAnswer]:
        """Every stored answer (skips included), in commit order."""
        with self._lock:
            rows = self._db.execute("SELECT item_id, annotator, skipped, value, time FROM answers "
                                    "ORDER BY id").fetchall()
        for item_id, annotator, skipped, value, t in rows:
            yield StoredAnswer(item_id, annotator, bool(skipped),
                               None if value is None else json.loads(value), t)
