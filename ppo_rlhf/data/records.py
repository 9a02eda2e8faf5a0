"""The record kinds of prompts and human feedback (see `ppo_rlhf.data` for the formats) and their
conversion to and from JSON objects."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

from ppo_rlhf.errors import DataError

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
