"""The annotation database: one SQLite file in WAL mode.

Durability: `journal_mode=WAL`; the transactions that store or undo an answer run with
`synchronous=FULL`, so their commit returns only after their WAL frames (and every earlier one)
are fsynced -- an acknowledged answer survives SIGKILL of the server and a power cut. The other
writes (reservations, counter recounts) commit with `synchronous=NORMAL`, without an fsync: a
crash can lose at most a reservation, and the item is then handed out again. The server
acknowledges an answer only after its transaction committed. Each write is one `BEGIN IMMEDIATE`
transaction (the checks, the insert, the release of the reservation and the counters together),
so two server threads -- or two processes on the same file -- cannot interleave inside one;
within a process one lock guards the single connection.

Schema (version 2; a version-1 file -- the same tables without the counters -- is migrated when it
is opened for writing, and read as it is by read-only opens):

  meta(key TEXT PRIMARY KEY, value TEXT)
      schema_version "2"; mode "choose"|"rank"|"rate"; k; scale (ratings 1..scale);
      salt (hex: seeds each annotator's response order, see answers.shown_order); created (UNIX s)
  items(id INTEGER PRIMARY KEY, prompt TEXT UNIQUE, responses TEXT, answered INTEGER, taken INTEGER)
      one per prompt; responses: a JSON array of the K response texts in the source's order --
      the ORIGINAL order, which stored answers index; answered: its non-skipped answers; taken:
      answered + its reservations (index items_by_taken(taken, id))
  answers(id INTEGER PRIMARY KEY, item_id -> items.id, annotator TEXT, skipped INTEGER 0|1,
          value TEXT, shown TEXT, time REAL, UNIQUE(item_id, annotator))
      value: the answer as JSON in original indices (answers.to_original), NULL when skipped;
      shown: JSON of the order the annotator saw (shown[j] = original index at position j);
      time: UNIX seconds of the commit. One answer per (item, annotator) -- `undo` can delete an
      annotator's latest one.
  reservations(item_id -> items.id, annotator TEXT, expires REAL, PRIMARY KEY(item_id, annotator))
      the item an annotator was last given and has not answered yet (one per annotator); it
      counts towards the item's `per_item` quota until `expires`, so two annotators are not
      handed the same last slot (indexed by annotator and by expiry).
  annotators(name TEXT PRIMARY KEY, answered, skipped, open_touched)
      per annotator: answers, skips, and the items they answered or skipped that are not full.
  counters(key TEXT PRIMARY KEY, value INTEGER)
      items; per_item: the quota the counters hold; full: items with answered >= per_item.

Assignment (`next_item`): an annotator gets again their live reservation if they have one (a
reload, a restarted server), else the first item (by id) that they have not answered and whose
non-skipped answers plus other annotators' live reservations number fewer than `per_item`. Skips
do not count towards `per_item`; a skipped item is not offered to the same annotator again
(unless the skip is undone). The counters make this and `progress` O(log n) index lookups
instead of a scan of every item; they are updated in the same transactions as the rows they count.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import quote

from ppo_rlhf.data.jsonl import fsync_dir
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.annotate.answers import Answer, AnswerError, shown_order, to_original

__all__ = ["Store", "Item", "StoredAnswer", "SCHEMA_VERSION", "DamagedDatabase"]

SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # read-only commands read both (items and answers are unchanged)
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
# Version 2 adds the counters that make `next_item` and `progress` O(log n); `_migrate` brings a
# version-1 file up to it (in one transaction) when it is opened for writing.
_SCHEMA_V2 = """
ALTER TABLE items ADD COLUMN answered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN taken INTEGER NOT NULL DEFAULT 0;
CREATE INDEX items_by_taken ON items (taken, id);
CREATE INDEX reservations_by_annotator ON reservations (annotator);
CREATE INDEX reservations_by_expiry ON reservations (expires);
CREATE TABLE annotators (name TEXT PRIMARY KEY, answered INTEGER NOT NULL, skipped INTEGER NOT NULL,
                         open_touched INTEGER NOT NULL);
CREATE TABLE counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
UPDATE items SET
    answered = (SELECT COUNT(*) FROM answers a WHERE a.item_id = items.id AND NOT a.skipped),
    taken = (SELECT COUNT(*) FROM answers a WHERE a.item_id = items.id AND NOT a.skipped)
          + (SELECT COUNT(*) FROM reservations r WHERE r.item_id = items.id);
INSERT INTO annotators SELECT annotator, SUM(NOT skipped), SUM(skipped), 0 FROM answers GROUP BY annotator;
INSERT INTO counters VALUES ('items', (SELECT COUNT(*) FROM items)), ('per_item', 0), ('full', 0);
"""


class DamagedDatabase(UsageError):
    """The file is an annotation database whose content cannot be read (truncated, corrupted)."""


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
    for reading and writing (a version-1 file is migrated); `Store(path, readonly=True)` opens it
    with SQLite's `mode=ro` (nothing is written, not even to a 0-byte file). UsageError if the
    file is missing or not an annotation database, `DamagedDatabase` (a UsageError) if it is
    one that cannot be read."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 _create: dict[str, Any] | None = None):
        self.path = Path(path)
        self.readonly = readonly
        if _create is None and not self.path.is_file():
            raise UsageError(f"{self.path}: no such annotation database")
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro",
                                           uri=True, timeout=30, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            else:
                self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                           check_same_thread=False)
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise UsageError(f"{self.path}: cannot switch to WAL mode (journal_mode={mode})")
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or not _is_damage(e):
                raise UsageError(f"{self.path}: not an SQLite database ({e})") from None
            raise self._damaged(e) from None
        # Durability where it matters: NORMAL (no fsync) for reservations, which a crash may lose
        # harmlessly; each answer's transaction switches to FULL (`_durable`), so its commit
        # fsyncs the WAL -- and with it every earlier frame -- before the API acknowledges it.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if _create is not None:
            self._create(**_create)
        self.meta = self._read_meta()
        self._check_intact()
        if not readonly and self.meta["schema_version"] == "1":
            self._migrate()
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
        meta = {"schema_version": "1", "mode": mode, "k": str(k), "scale": str(scale),
                "salt": salt, "created": repr(time.time())}
        with self._durable(), self._tx():
            for stmt in (_SCHEMA + _SCHEMA_V2).split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                             (SCHEMA_VERSION,))

    def _migrate(self) -> None:
        """Version 1 -> 2: the counters and indexes, computed from the rows, in one transaction."""
        with self._lock, self._durable(), self._tx() as db:
            if db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1":
                for stmt in _SCHEMA_V2.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                           (SCHEMA_VERSION,))
        self.meta["schema_version"] = SCHEMA_VERSION

    def _read_meta(self) -> dict[str, str]:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:
            raise UsageError(f"{self.path}: not an annotation database (no meta table)") from None
        except sqlite3.DatabaseError as e:
            raise self._damaged(e) from None
        if meta.get("schema_version") not in READABLE_VERSIONS:
            raise UsageError(f"{self.path}: annotation database schema "
                             f"{meta.get('schema_version')!r}; this version reads "
                             f"{' and '.join(map(repr, READABLE_VERSIONS))}")
        missing = [k for k in ("mode", "k", "scale", "salt") if k not in meta]
        if missing:
            raise self._damaged(f"meta lacks {', '.join(missing)}")
        return meta

    def _check_intact(self) -> None:
        try:
            result = [r[0] for r in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as e:
            raise self._damaged(e) from None
        if result != ["ok"]:
            raise self._damaged(result[0])

    def _damaged(self, why: Any) -> DamagedDatabase:
        why = " ".join(str(why).split())[:200]
        return DamagedDatabase(f"{self.path}: the annotation database is damaged ({why}); "
                               f"restore it from a copy")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- transactions ------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "Store"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            try:
                self.store._db.execute("BEGIN IMMEDIATE")  # the write lock now: no upgrade deadlocks
            except sqlite3.DatabaseError as e:
                if _is_damage(e):
                    raise self.store._damaged(e) from None
                raise
            return self.store._db

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                try:
                    self.store._db.execute("COMMIT")
                    return
                except sqlite3.DatabaseError as e:
                    exc_type, exc = type(e), e
            try:
                self.store._db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass  # no transaction left to roll back (SQLite ended it)
            if _is_damage(exc):
                raise self.store._damaged(exc) from None
            if exc_type is not None and exc is not None and tb is None:
                raise exc

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self)

    @contextmanager
    def _durable(self) -> Iterator[None]:
        """The transaction inside commits with synchronous=FULL (its WAL frames fsynced)."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def _reading(self) -> "contextlib.AbstractContextManager[None]":
        return _reading(self)

    # ---- items -------------------------------------------------------------------------------
    def prompts(self) -> set[str]:
        with self._lock, self._reading():
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
        with self._lock, self._durable(), self._tx() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO items (prompt, responses) VALUES (?, ?)", rows)
            added = db.total_changes - before
            db.execute("UPDATE counters SET value = value + ? WHERE key = 'items'", (added,))
            return added

    def num_items(self) -> int:
        with self._lock, self._reading():
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def items(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        """id -> (prompt, responses in original order)."""
        with self._lock, self._reading():
            return {i: (p, tuple(json.loads(r)))
                    for i, p, r in self._db.execute("SELECT id, prompt, responses FROM items")}

    def _item(self, item_id: int, annotator: str) -> Item | None:
        if not -(2 ** 63) <= item_id < 2 ** 63:  # SQLite's integers are 64-bit
            return None
        row = self._db.execute("SELECT prompt, responses FROM items WHERE id = ?",
                               (item_id,)).fetchone()
        if row is None:
            return None
        order = shown_order(self._salt, item_id, annotator, self.k)
        return Item(item_id, row[0], tuple(json.loads(row[1])), tuple(order))

    # ---- counters (schema 2) -----------------------------------------------------------------
    # items.answered: the item's non-skipped answers; items.taken: answered + its reservations
    # (expired ones are deleted, and uncounted, before every assignment). counters: 'items';
    # 'full' = items with answered >= 'per_item', the quota they were counted for; annotators:
    # answered, skipped, open_touched = items they answered or skipped that are not full. A
    # different quota (a restart with another --per-item) recounts 'full' and open_touched once.
    def _counter(self, db: sqlite3.Connection, key: str) -> int:
        return db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()[0]

    def _quota(self, db: sqlite3.Connection, per_item: int | None) -> int:
        """The quota the counters hold (recounted for `per_item` first when it differs)."""
        held = self._counter(db, "per_item")
        if per_item is None or per_item == held:
            return held
        db.execute("UPDATE counters SET value = ? WHERE key = 'per_item'", (per_item,))
        db.execute("UPDATE counters SET value = (SELECT COUNT(*) FROM items WHERE answered >= ?) "
                   "WHERE key = 'full'", (per_item,))
        db.execute("UPDATE annotators SET open_touched = (SELECT COUNT(*) FROM answers a JOIN "
                   "items i ON i.id = a.item_id WHERE a.annotator = annotators.name AND "
                   "i.answered < ?)", (per_item,))
        return per_item

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        for (item_id,) in db.execute("SELECT item_id FROM reservations WHERE expires <= ?",
                                     (now,)).fetchall():
            db.execute("UPDATE items SET taken = taken - 1 WHERE id = ?", (item_id,))
        db.execute("DELETE FROM reservations WHERE expires <= ?", (now,))

    def _release(self, db: sqlite3.Connection, annotator: str) -> None:
        for (item_id,) in db.execute("SELECT item_id FROM reservations WHERE annotator = ?",
                                     (annotator,)).fetchall():
            db.execute("UPDATE items SET taken = taken - 1 WHERE id = ?", (item_id,))
        db.execute("DELETE FROM reservations WHERE annotator = ?", (annotator,))

    def _reserve(self, db: sqlite3.Connection, item_id: int, annotator: str, until: float) -> None:
        self._release(db, annotator)
        db.execute("INSERT INTO reservations VALUES (?, ?, ?)", (item_id, annotator, until))
        db.execute("UPDATE items SET taken = taken + 1 WHERE id = ?", (item_id,))

    def _count_answer(self, db: sqlite3.Connection, item_id: int, annotator: str, skipped: bool,
                      quota: int, sign: int) -> None:
        """Update the counters for adding (sign +1) or removing (-1) one answer row."""
        answered = db.execute("SELECT answered FROM items WHERE id = ?", (item_id,)).fetchone()[0]
        after = answered + (0 if skipped else sign)
        if not skipped:
            db.execute("UPDATE items SET answered = ?, taken = taken + ? WHERE id = ?",
                       (after, sign, item_id))
        db.execute("INSERT OR IGNORE INTO annotators VALUES (?, 0, 0, 0)", (annotator,))
        # this annotator's own row counts the item as open-touched iff it is not full with them
        mine_open = (after if sign > 0 else answered) < quota
        db.execute(f"UPDATE annotators SET {'skipped' if skipped else 'answered'} = "
                   f"{'skipped' if skipped else 'answered'} + ?, open_touched = open_touched + ? "
                   f"WHERE name = ?", (sign, sign * int(mine_open), annotator))
        was_full, is_full = answered >= quota, after >= quota
        if was_full != is_full:  # the item filled up (or opened again): everyone else who
            step = 1 if is_full else -1  # touched it sees it change between open and full
            db.execute("UPDATE counters SET value = value + ? WHERE key = 'full'", (step,))
            db.execute("UPDATE annotators SET open_touched = open_touched - ? WHERE name IN "
                       "(SELECT annotator FROM answers WHERE item_id = ? AND annotator != ?)",
                       (step, item_id, annotator))

    # ---- assignment --------------------------------------------------------------------------
    def next_item(self, annotator: str, *, per_item: int, reserve_s: float,
                  now: float | None = None) -> Item | None:
        """The item `annotator` should answer next (reserved for them for `reserve_s` seconds),
        or None when nothing is left for them. See the module docstring. Cost: O(log n) index
        lookups, plus one per item at the scanned quota levels that this annotator already
        answered or skipped (none with --per-item 1 unless they skipped)."""
        now = time.time() if now is None else now
        with self._lock, self._tx() as db:
            quota = self._quota(db, per_item)
            self._expire(db, now)
            row = db.execute("SELECT item_id FROM reservations WHERE annotator = ? "
                             "ORDER BY item_id LIMIT 1", (annotator,)).fetchone()
            if row is None:
                found = []
                for level in range(quota):
                    r = db.execute(
                        "SELECT id FROM items INDEXED BY items_by_taken WHERE taken = ? AND NOT "
                        "EXISTS (SELECT 1 FROM answers a WHERE a.item_id = items.id AND "
                        "a.annotator = ?) ORDER BY id LIMIT 1", (level, annotator)).fetchone()
                    if r is not None:
                        found.append(r[0])
                if not found:
                    return None
                self._reserve(db, min(found), annotator, now + reserve_s)
                item_id = min(found)
            else:
                item_id = row[0]
                db.execute("UPDATE reservations SET expires = ? WHERE annotator = ?",
                           (now + reserve_s, annotator))
            return self._item(item_id, annotator)

    def progress(self, annotator: str, *, per_item: int) -> dict[str, int]:
        """{"done": items this annotator answered (skips not counted), "skipped": items they
        skipped, "total": done + the items still open to them (not answered or skipped by them,
        fewer than `per_item` answers)}. O(log n): counters kept in the answers' transactions."""
        with self._lock, self._tx() as db:
            self._quota(db, per_item)
            row = db.execute("SELECT answered, skipped, open_touched FROM annotators WHERE name = ?",
                             (annotator,)).fetchone() or (0, 0, 0)
            open_ = self._counter(db, "items") - self._counter(db, "full") - row[2]
        return {"done": row[0], "skipped": row[1], "total": row[0] + open_}

    # ---- answers -----------------------------------------------------------------------------
    def record(self, item_id: int, annotator: str, answer: Answer, *, per_item: int | None = None,
               now: float | None = None) -> None:
        """Store `annotator`'s answer to item `item_id` (in shown indices; mapped back to the
        original ones here) and release their reservation, in one committed (fsynced)
        transaction. With `per_item` (the server always gives it) the quota is enforced in that
        transaction: an answer (not a skip) must fill the slot reserved for this annotator, or
        one still open (fewer than `per_item` answers plus other annotators' live reservations).
        Raises `AnswerError` (nothing stored) for an unknown item, a second answer or no slot."""
        now = time.time() if now is None else now
        with self._lock, self._durable(), self._tx() as db:
            item = self._item(item_id, annotator)
            if item is None:
                raise AnswerError(f"unknown item {item_id}")
            if db.execute("SELECT 1 FROM answers WHERE item_id = ? AND annotator = ?",
                          (item_id, annotator)).fetchone():
                raise AnswerError(f"{annotator} has already answered item {item_id}")
            quota = self._quota(db, per_item)
            if per_item is not None and not answer.skipped:
                self._expire(db, now)
                mine = db.execute("SELECT 1 FROM reservations WHERE item_id = ? AND annotator = ?",
                                  (item_id, annotator)).fetchone()
                taken = db.execute("SELECT taken FROM items WHERE id = ?", (item_id,)).fetchone()[0]
                if not mine and taken >= per_item:
                    raise AnswerError(
                        f"item {item_id} is not open to {annotator}: its {per_item} answer slot(s) "
                        f"are answered or reserved by others (a reservation lasts --reserve "
                        f"seconds); ask for the next item")
            value = None if answer.skipped else json.dumps(
                to_original(self.mode, answer.value, list(item.order)))
            db.execute("INSERT INTO answers (item_id, annotator, skipped, value, shown, time) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (item_id, annotator, int(answer.skipped), value,
                        json.dumps(list(item.order)), now))
            if db.execute("DELETE FROM reservations WHERE item_id = ? AND annotator = ?",
                          (item_id, annotator)).rowcount:
                db.execute("UPDATE items SET taken = taken - 1 WHERE id = ?", (item_id,))
            self._count_answer(db, item_id, annotator, answer.skipped, quota, +1)

    def undo(self, item_id: int, annotator: str, *, per_item: int, reserve_s: float,
             now: float | None = None) -> None:
        """Take back `annotator`'s answer (or skip) to `item_id` while it is still their latest,
        and reserve the item for them again (their next item); one committed transaction.
        AnswerError if it is not their latest answer, or if a skipped item has meanwhile been
        given all its answers by others."""
        now = time.time() if now is None else now
        with self._lock, self._durable(), self._tx() as db:
            quota = self._quota(db, per_item)
            self._expire(db, now)
            latest = db.execute("SELECT id, item_id, skipped FROM answers WHERE annotator = ? "
                                "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if latest is None or latest[1] != item_id:
                raise AnswerError(f"only {annotator}'s latest answer can be undone, and item "
                                  f"{item_id} is not it")
            skipped = bool(latest[2])
            if skipped:
                taken = db.execute("SELECT taken FROM items WHERE id = ?", (item_id,)).fetchone()[0]
                mine = db.execute("SELECT 1 FROM reservations WHERE annotator = ? AND item_id = ?",
                                  (annotator, item_id)).fetchone()
                if taken - (1 if mine else 0) >= quota:
                    raise AnswerError(f"item {item_id} has meanwhile been answered by others; "
                                      f"the skip stays")
            self._count_answer(db, item_id, annotator, skipped, quota, -1)
            db.execute("DELETE FROM answers WHERE id = ?", (latest[0],))
            self._reserve(db, item_id, annotator, now + reserve_s)

    def answers(self) -> Iterator[StoredAnswer]:
        """Every stored answer (skips included), in commit order."""
        with self._lock, self._reading():
            rows = self._db.execute("SELECT item_id, annotator, skipped, value, time FROM answers "
                                    "ORDER BY id").fetchall()
            out = [StoredAnswer(item_id, annotator, bool(skipped),
                                None if value is None else json.loads(value), t)
                   for item_id, annotator, skipped, value, t in rows]
        yield from out


@contextmanager
def _reading(store: Store) -> Iterator[None]:
    """Reads of rows: a damaged file (SQLite errors, rows that are not what was written) is one
    DamagedDatabase line naming it."""
    try:
        yield
    except sqlite3.DatabaseError as e:
        raise store._damaged(e) from None
    except (TypeError, ValueError) as e:  # e.g. json.loads(None): a NOT NULL column read as NULL
        raise store._damaged(e) from None


def _is_damage(e: BaseException | None) -> bool:
    """An SQLite error that means the file is damaged -- not a busy lock, a constraint or a bug."""
    if not isinstance(e, sqlite3.DatabaseError):
        return False
    if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
        return False
    return not (isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)))
