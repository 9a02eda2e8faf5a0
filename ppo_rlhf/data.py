"""Data formats for prompts and human feedback: records, streaming readers, writers, converters.

Every format is JSON Lines (one JSON object per line, UTF-8); prompts may also be plain text.
Blank lines are skipped everywhere. Keys not listed below are kept, unvalidated, in the record's
`extra` dict and written back as they were (so `"meta": {...}`, `"id"`, `"source"` survive a
round trip). Numbers must be finite: `NaN`/`Infinity` are refused.

prompt     {"prompt": str}                                   `PromptRecord`
           or a plain-text file with one prompt per line (the line ending is stripped, nothing
           else; blank lines are skipped; use JSONL for prompts that hold a newline).
responses  {"prompt": str, "responses": [str, ...]}           `ResponsesRecord`
           unlabelled samples, e.g. pre-generated for `ppo-rlhf label --responses`.
pairwise   {"prompt": str, "chosen": str, "rejected": str}    `PairwiseRecord`
           (HH-RLHF style) with optional `"tie": true` -- the person judged the two equally good;
           then the order of chosen/rejected carries no meaning.
ranking    {"prompt": str, "responses": [str, ...], "ranking": [...]}   `RankingRecord`
           `ranking` lists indices into `responses` (0-based) from BEST to WORST; every index
           appears exactly once. An element may be a list of indices instead of one index: those
           responses are TIED at that place. `[2, [0, 3], 1]` reads "2 is best, then 0 and 3
           (equally good), then 1". K >= 2 responses.
rating     {"prompt": str, "response": str, "rating": number}  `RatingRecord`
           higher is better; the scale is the user's (e.g. 1..7); `rating` is a float.

Prompts must be non-empty strings; responses may be empty (a policy can emit EOS at once).

Readers (`read_prompts`, `read_records`, ...) are generators: they stream the file line by line
and validate each record as it is read. A bad record raises `DataError` whose message starts
with `path:line:`. A file with no records is an error too unless `allow_empty=True` -- since the
readers are lazy, that error comes when the iteration ends.

For Bradley-Terry reward-model training everything converts to pairs: `ranking_to_pairs` (all
K(K-1)/2 pairs of a ranking), `ratings_to_pairs` (responses to the same prompt with different
ratings) and `to_pairs` (any mix). Ties are dropped unless `ties="keep"`.

`to_hf_dataset` / `from_hf_dataset` move the same records through the `datasets` library
(imported lazily; `pip install datasets`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Union

from ppo_rlhf.errors import DataError

__all__ = [
    "DataError", "PromptRecord", "ResponsesRecord", "PairwiseRecord", "RankingRecord",
    "RatingRecord", "Record", "KINDS", "detect_kind", "record_from_dict", "record_to_dict",
    "iter_jsonl", "read_records", "read_prompts", "load_prompts", "read_responses",
    "read_pairwise", "read_rankings", "read_ratings", "write_records", "JsonlWriter",
    "ranking_to_pairs", "ratings_to_pairs", "to_pairs", "to_hf_dataset", "from_hf_dataset",
]

Kind = Literal["prompt", "responses", "pairwise", "ranking", "rating"]
KINDS: tuple[str, ...] = ("prompt", "responses", "pairwise", "ranking", "rating")
Ties = Literal["drop", "keep"]
PathLike = Union[str, "os.PathLike[str]"]


# ---- records -------------------------------------------------------------------------------

def _check_str(name: str, value: Any, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(f'"{name}" must be a string, got {_json_type(value)}')
    if nonempty and not value:
        raise DataError(f'"{name}" is empty')


def _check_extra(extra: Any, schema: tuple[str, ...]) -> None:
    if not isinstance(extra, dict):
        raise DataError(f"extra must be a dict, got {type(extra).__name__}")
    clash = [k for k in extra if k in schema]
    if clash:
        raise DataError(f"extra may not hold the record's own field {clash[0]!r}")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                     type(value).__name__)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt."""

    prompt: str
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    FIELDS = ("prompt",)

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, nonempty=True)
        _check_extra(self.extra, self.FIELDS)


@dataclass(frozen=True)
class ResponsesRecord:
    """Unlabelled responses to one prompt (e.g. pre-generated for the labelling tool)."""

    prompt: str
    responses: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    FIELDS = ("prompt", "responses")

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, nonempty=True)
        object.__setattr__(self, "responses", _str_tuple("responses", self.responses, min_len=1))
        _check_extra(self.extra, self.FIELDS)


@dataclass(frozen=True)
class PairwiseRecord:
    """`chosen` was preferred to `rejected` for `prompt` (or, with `tie`, judged equally good)."""

    prompt: str
    chosen: str
    rejected: str
    tie: bool = False
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    FIELDS = ("prompt", "chosen", "rejected", "tie")

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, nonempty=True)
        _check_str("chosen", self.chosen)
        _check_str("rejected", self.rejected)
        if not isinstance(self.tie, bool):
            raise DataError(f'"tie" must be true or false, got {_json_type(self.tie)}')
        _check_extra(self.extra, self.FIELDS)


def _str_tuple(name: str, value: Any, *, min_len: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f'"{name}" must be an array of strings, got {_json_type(value)}')
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise DataError(f'"{name}"[{i}] must be a string, got {_json_type(v)}')
    if len(value) < min_len:
        raise DataError(f'"{name}" needs at least {min_len} entries, got {len(value)}')
    return tuple(value)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RankingRecord:
    """K responses to one prompt, ranked. `ranking` holds indices into `responses` from best to
    worst; an element that is a tuple of indices is a group of tied responses. Singleton groups
    are normalised to plain ints, so `[[2], [0, 3], [1]]` and `[2, [0, 3], 1]` are equal."""

    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int | tuple[int, ...], ...]
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    FIELDS = ("prompt", "responses", "ranking")

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, nonempty=True)
        responses = _str_tuple("responses", self.responses, min_len=2)
        object.__setattr__(self, "responses", responses)
        object.__setattr__(self, "ranking", _normalise_ranking(self.ranking, len(responses)))
        _check_extra(self.extra, self.FIELDS)

    @property
    def tiers(self) -> tuple[tuple[int, ...], ...]:
        """The ranking as groups of tied indices, best group first: `((2,), (0, 3), (1,))`."""
        return tuple((t,) if isinstance(t, int) else t for t in self.ranking)

    @property
    def has_ties(self) -> bool:
        return any(not isinstance(t, int) for t in self.ranking)


def _normalise_ranking(ranking: Any, k: int) -> tuple[int | tuple[int, ...], ...]:
    if not isinstance(ranking, (list, tuple)):
        raise DataError(f'"ranking" must be an array of indices into "responses", got '
                        f"{_json_type(ranking)}")
    out: list[int | tuple[int, ...]] = []
    seen: list[int] = []
    for pos, entry in enumerate(ranking):
        group = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not group:
            raise DataError(f'"ranking"[{pos}] is an empty group of ties')
        for i in group:
            if not _is_index(i):
                raise DataError(f'"ranking"[{pos}] must hold indices (integers) into "responses", '
                                f"got {_json_type(i)} {i!r}")
            if not 0 <= i < k:
                raise DataError(f'"ranking" index {i} is out of range: "responses" has {k} entries '
                                f"(indices 0..{k - 1})")
            if i in seen:
                raise DataError(f'"ranking" lists response {i} twice')
            seen.append(i)
        out.append(group[0] if len(group) == 1 else tuple(group))
    if len(seen) != k:
        missing = sorted(set(range(k)) - set(seen))
        raise DataError(f'"ranking" must rank every response exactly once; missing {missing}')
    return tuple(out)


@dataclass(frozen=True)
class RatingRecord:
    """One response to `prompt` with a scalar `rating` (higher is better)."""

    prompt: str
    response: str
    rating: float
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    FIELDS = ("prompt", "response", "rating")

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt, nonempty=True)
        _check_str("response", self.response)
        r = self.rating
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise DataError(f'"rating" must be a finite number, got {_json_type(r)} {r!r}')
        object.__setattr__(self, "rating", float(r))
        _check_extra(self.extra, self.FIELDS)


Record = Union[PromptRecord, ResponsesRecord, PairwiseRecord, RankingRecord, RatingRecord]
_CLASSES: dict[str, type] = {"prompt": PromptRecord, "responses": ResponsesRecord,
                             "pairwise": PairwiseRecord, "ranking": RankingRecord,
                             "rating": RatingRecord}
_KIND_OF: dict[type, str] = {cls: kind for kind, cls in _CLASSES.items()}


# ---- dict <-> record -----------------------------------------------------------------------

def detect_kind(obj: Mapping[str, Any]) -> str:
    """The kind of a JSON object from its keys: "chosen"/"rejected" -> pairwise, "ranking" ->
    ranking, "rating" -> rating, "responses" -> responses, else prompt."""
    kinds = [kind for kind, keys in (("pairwise", ("chosen", "rejected")), ("ranking", ("ranking",)),
                                     ("rating", ("rating",))) if any(k in obj for k in keys)]
    if len(kinds) > 1:
        raise DataError(f"record has fields of several kinds ({', '.join(kinds)}); "
                        f"cannot tell which it is")
    if kinds:
        return kinds[0]
    return "responses" if "responses" in obj else "prompt"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed {', '.join(map(repr, KINDS))}")


def record_from_dict(obj: Any, kind: str | None = None) -> Record:
    """Validate one decoded JSON object and build its record (kind detected when None).
    Keys outside the kind's fields go to `extra`. Raises `DataError` (without a location)."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_json_type(obj)}")
    kind = detect_kind(obj) if kind is None else kind
    _check_kind(kind)
    cls = _CLASSES[kind]
    missing = [k for k in cls.FIELDS if k not in obj and k != "tie"]
    if missing:
        raise DataError(f"{kind} record lacks the field{'s' if len(missing) > 1 else ''} "
                        + ", ".join(f'"{k}"' for k in missing))
    kwargs = {k: obj[k] for k in cls.FIELDS if k in obj}
    extra = {k: v for k, v in obj.items() if k not in cls.FIELDS}
    return cls(**kwargs, extra=extra)


def record_to_dict(rec: Record) -> dict[str, Any]:
    """The JSON object of a record: its fields, then `extra`. A pairwise `tie` is written only
    when true; a ranking's tied groups as nested arrays."""
    kind = _KIND_OF.get(type(rec))
    if kind is None:
        raise TypeError(f"not a record: {type(rec).__name__}")
    out: dict[str, Any] = {"prompt": rec.prompt}
    if isinstance(rec, ResponsesRecord):
        out["responses"] = list(rec.responses)
    elif isinstance(rec, PairwiseRecord):
        out.update(chosen=rec.chosen, rejected=rec.rejected)
        if rec.tie:
            out["tie"] = True
    elif isinstance(rec, RankingRecord):
        out["responses"] = list(rec.responses)
        out["ranking"] = [t if isinstance(t, int) else list(t) for t in rec.ranking]
    elif isinstance(rec, RatingRecord):
        out.update(response=rec.response, rating=rec.rating)
    out.update(rec.extra)
    return out


def dumps_record(rec: Record) -> str:
    """One JSONL line (with its trailing newline). Non-ASCII text is written as is (UTF-8)."""
    return json.dumps(record_to_dict(rec), ensure_ascii=False, allow_nan=False) + "\n"


# ---- readers -------------------------------------------------------------------------------

def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, decoded JSON value) for each non-blank line, streaming.
    Undecodable UTF-8, invalid JSON and NaN/Infinity raise `DataError` at `path:line`."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path,
                                line=lineno) from None
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
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=path,
                                line=lineno) from None
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


# ---- conversion to pairs (Bradley-Terry training) ------------------------------------------

def _check_ties(ties: str) -> None:
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties={ties!r} is invalid: allowed 'drop', 'keep'")


def ranking_to_pairs(rec: RankingRecord, *, ties: Ties = "drop") -> list[PairwiseRecord]:
    """All K(K-1)/2 pairs of a ranking: for each pair the better-ranked response is `chosen`.
    Pairs within a group of ties are dropped, or kept with `tie=True` (then `chosen` is the one
    with the lower index). Pairs come in ranking order; `extra` is copied to each pair."""
    _check_ties(ties)
    tiers = rec.tiers
    out: list[PairwiseRecord] = []
    for a, tier_a in enumerate(tiers):
        if ties == "keep":
            for i, j in itertools.combinations(sorted(tier_a), 2):
                out.append(PairwiseRecord(rec.prompt, rec.responses[i], rec.responses[j],
                                          tie=True, extra=dict(rec.extra)))
        for tier_b in tiers[a + 1:]:
            for i in tier_a:
                for j in tier_b:
                    out.append(PairwiseRecord(rec.prompt, rec.responses[i], rec.responses[j],
                                              extra=dict(rec.extra)))
    return out


def ratings_to_pairs(records: Iterable[RatingRecord], *,
                     ties: Ties = "drop") -> Iterator[PairwiseRecord]:
    """Pairs of responses to the same prompt: the higher-rated one is `chosen`. Equal ratings
    are dropped, or kept with `tie=True`. Two ratings of the same response text never make a
    pair (there is nothing to compare). The pairs carry no `extra`. Holds all ratings in memory
    (grouped by prompt, in first-seen order); pairs follow the input order within each prompt."""
    _check_ties(ties)
    groups: dict[str, list[RatingRecord]] = {}
    for r in records:
        if not isinstance(r, RatingRecord):
            raise TypeError(f"ratings_to_pairs expects RatingRecords, got {type(r).__name__}")
        groups.setdefault(r.prompt, []).append(r)
    for prompt, group in groups.items():
        for a, b in itertools.combinations(group, 2):
            if a.response == b.response:
                continue
            if a.rating == b.rating:
                if ties == "keep":
                    yield PairwiseRecord(prompt, a.response, b.response, tie=True)
                continue
            hi, lo = (a, b) if a.rating > b.rating else (b, a)
            yield PairwiseRecord(prompt, hi.response, lo.response)


def to_pairs(records: Iterable[Record], *, ties: Ties = "drop") -> Iterator[PairwiseRecord]:
    """Pairwise records from any mix of pairwise, ranking and rating records (pairwise ties are
    dropped unless `ties="keep"`). Ratings are grouped over the whole input, so their pairs come
    last. Prompt and responses records carry no preference and are refused."""
    _check_ties(ties)
    ratings: list[RatingRecord] = []
    for rec in records:
        if isinstance(rec, PairwiseRecord):
            if ties == "keep" or not rec.tie:
                yield rec
        elif isinstance(rec, RankingRecord):
            yield from ranking_to_pairs(rec, ties=ties)
        elif isinstance(rec, RatingRecord):
            ratings.append(rec)
        else:
            raise TypeError(f"{type(rec).__name__} holds no preference; cannot make pairs from it")
    yield from ratings_to_pairs(ratings, ties=ties)


# ---- Hugging Face `datasets` ---------------------------------------------------------------

def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("this needs the `datasets` library: pip install datasets "
                          "(or pip install 'ppo-rlhf[hf]')") from None
    return datasets


def _hf_row(rec: Record) -> dict[str, Any]:
    """A record as a row with a fixed set of columns per kind: a ranking is stored as a list of
    tied groups (Arrow columns need one type), extras as one JSON string column `extra`."""
    row = record_to_dict(rec)
    for k in rec.extra:
        del row[k]
    if isinstance(rec, PairwiseRecord):
        row["tie"] = rec.tie
    if isinstance(rec, RankingRecord):
        row["ranking"] = [list(t) for t in rec.tiers]
    row["extra"] = json.dumps(rec.extra, ensure_ascii=False, allow_nan=False)
    return row


def _hf_rows(path: str, kind: str, stamp: tuple[int, int]) -> Iterator[dict[str, Any]]:
    # `stamp` (mtime, size) is unused here: it is part of `datasets`' cache fingerprint, so an
    # edited file is re-read instead of served from a stale cache.
    for rec in read_records(path, kind):
        yield _hf_row(rec)


def to_hf_dataset(path: PathLike, kind: str | None = None, **from_generator_kwargs: Any) -> Any:
    """Load a JSONL file of one kind into a `datasets.Dataset` (streamed into Arrow, not held in
    memory). `kind=None` takes the kind of the first record. Columns are the kind's fields plus
    `extra` (a JSON string of the record's extra keys); a pairwise `tie` is always present and a
    ranking is a list of tied groups, `[[2], [0, 3], [1]]`."""
    datasets = _import_datasets()
    path = str(path)
    if kind is None:
        first = next(iter_jsonl(path), None)
        if first is None:
            raise DataError("no records in the file", path=path)
        try:
            kind = detect_kind(first[1]) if isinstance(first[1], dict) else "prompt"
        except DataError as e:
            raise DataError(e.reason, path=path, line=first[0]) from None
    _check_kind(kind)
    st = os.stat(path)
    return datasets.Dataset.from_generator(
        _hf_rows, gen_kwargs={"path": os.path.abspath(path), "kind": kind,
                              "stamp": (st.st_mtime_ns, st.st_size)},
        **from_generator_kwargs)


def from_hf_dataset(ds: Iterable[Mapping[str, Any]], kind: str) -> Iterator[Record]:
    """Records from the rows of a `datasets.Dataset` (or any iterable of dicts) of one kind.
    Accepts what `to_hf_dataset` writes and plain columns too (e.g. prompt/chosen/rejected of a
    Hub dataset): a string column `extra` is decoded as JSON, other unknown columns go to
    `extra`, a null `tie` means false. A bad row raises `DataError` naming its index."""
    _check_kind(kind)
    for i, row in enumerate(ds):
        obj = dict(row)
        extra_json = obj.pop("extra", None)
        try:
            if extra_json is not None:
                if not isinstance(extra_json, str):
                    raise DataError(f'column "extra" must be a JSON string, got {_json_type(extra_json)}')
                extra = json.loads(extra_json, parse_constant=_refuse_constant)
                if not isinstance(extra, dict):
                    raise DataError('column "extra" must hold a JSON object')
                obj = {**obj, **{k: v for k, v in extra.items() if k not in obj}}
            if kind == "pairwise" and obj.get("tie", False) is None:
                obj["tie"] = False
            yield record_from_dict(obj, kind)
        except (DataError, ValueError) as e:
            reason = e.reason if isinstance(e, DataError) else str(e)
            raise DataError(f"dataset row {i}: {reason}") from None
