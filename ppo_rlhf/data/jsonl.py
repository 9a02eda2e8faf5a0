"""Streaming JSONL readers and (durable) writers of the records in `ppo_rlhf.data.records`; prompt
files may also be plain text. Errors name `path:line`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from ppo_rlhf.data.records import (
    PairwiseRecord,
    PathLike,
    PromptRecord,
    RankingRecord,
    RatingRecord,
    Record,
    ResponsesRecord,
    _check_kind,
    dumps_record,
    record_from_dict,
)
from ppo_rlhf.errors import DataError

# ---- readers -------------------------------------------------------------------------------

def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _text_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, streaming (a byte-order mark dropped);
    DataError at `path` / `path:line` when it cannot be read or decoded."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path,
                                line=lineno) from None


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, decoded JSON value) for each non-blank line, streaming.
    Undecodable UTF-8, invalid JSON and NaN/Infinity raise `DataError` at `path:line`."""
    for lineno, text in _text_lines(path):
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text, parse_constant=_refuse_constant)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise DataError(f"invalid JSON: {e}", path=path, line=lineno) from None


def read_records(path: PathLike, kind: str | None = None, *,
                 allow_empty: bool = False) -> Iterator[Record]:
    """Stream the records of a JSONL file. With `kind=None` each line's kind is detected from
    its keys (a file may then mix kinds); otherwise every line must be of that kind (a prompt
    reader accepts any record with a "prompt", e.g. a preference file)."""
    if kind is not None:
        _check_kind(kind)
    n = 0
    for lineno, obj in iter_jsonl(path):
        try:
            rec = record_from_dict(obj, kind)
        except DataError as e:
            raise DataError(e.reason, path=path, line=lineno) from None
        n += 1
        yield rec
    if n == 0 and not allow_empty:
        raise DataError(f"no {kind + ' ' if kind else ''}records in the file", path=path)


def _prompt_format(path: PathLike, format: str) -> str:
    if format == "auto":
        return "jsonl" if str(path).lower().endswith((".jsonl", ".json", ".ndjson")) else "text"
    if format not in ("jsonl", "text"):
        raise ValueError(f"format={format!r} is invalid: allowed 'auto', 'jsonl', 'text'")
    return format


def read_prompts(path: PathLike, *, format: str = "auto",
                 allow_empty: bool = False) -> Iterator[PromptRecord]:
    """Stream the prompts of a file: JSONL (`{"prompt": ...}`, extra keys kept) when `format`
    is "jsonl" or, with "auto", when the name ends in .jsonl/.json/.ndjson; else plain text,
    one prompt per line. A file without prompts raises `DataError`."""
    if _prompt_format(path, format) == "jsonl":
        yield from read_records(path, "prompt", allow_empty=allow_empty)
        return
    n = 0
    for _, text in _text_lines(path):
        text = text.removesuffix("\n").removesuffix("\r")
        if not text.strip():
            continue
        n += 1
        yield PromptRecord(text)
    if n == 0 and not allow_empty:
        raise DataError("no prompts in the file", path=path)


def load_prompts(path: PathLike, *, format: str = "auto") -> list[str]:
    """All prompts of a file as a list of strings (reads the whole file)."""
    return [r.prompt for r in read_prompts(path, format=format)]


def read_responses(path: PathLike, **kw: Any) -> Iterator[ResponsesRecord]:
    return read_records(path, "responses", **kw)  # type: ignore[return-value]


def read_pairwise(path: PathLike, **kw: Any) -> Iterator[PairwiseRecord]:
    return read_records(path, "pairwise", **kw)  # type: ignore[return-value]


def read_rankings(path: PathLike, **kw: Any) -> Iterator[RankingRecord]:
    return read_records(path, "ranking", **kw)  # type: ignore[return-value]


def read_ratings(path: PathLike, **kw: Any) -> Iterator[RatingRecord]:
    return read_records(path, "rating", **kw)  # type: ignore[return-value]


# ---- writers -------------------------------------------------------------------------------

class JsonlWriter:
    """Appends (or writes) records to a JSONL file, one line each.

    With `durable=True` every `write` is flushed and `os.fsync`ed before it returns, and a newly
    created file's directory entry is fsynced too: once `write` returns, the record survives a
    crash or power loss. Several records passed to one `write` go out in a single write call.
    """

    def __init__(self, path: PathLike, *, append: bool = False, durable: bool = False):
        self.path = Path(path)
        self.durable = durable
        created = not self.path.exists()
        self._f = open(self.path, "a" if append else "w", encoding="utf-8", newline="\n")
        if durable and created:
            fsync_dir(self.path.parent)

    def write(self, *records: Record) -> None:
        self._f.write("".join(dumps_record(r) for r in records))
        self._f.flush()
        if self.durable:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a file just created in it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the file itself is still synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_records(path: PathLike, records: Iterable[Record], *, append: bool = False,
                  durable: bool = False) -> int:
    """Write records as JSONL (overwriting unless `append`); returns how many were written."""
    n = 0
    with JsonlWriter(path, append=append, durable=durable) as w:
        for rec in records:
            w.write(rec)
            n += 1
    return n


def write_prompts_text(path: PathLike, prompts: Iterable[str]) -> int:
    """Write prompts as plain text, one per line (refuses prompts holding a line break)."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for p in prompts:
            PromptRecord(p)  # validates
            if "\n" in p or "\r" in p:
                raise DataError(f"prompt {n} holds a line break; write it as JSONL instead")
            f.write(p + "\n")
            n += 1
    return n
