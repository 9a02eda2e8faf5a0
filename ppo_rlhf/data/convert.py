"""Conversions: preferences to Bradley-Terry pairs, and records through Hugging Face `datasets`."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable, Iterator, Mapping

from ppo_rlhf.data.jsonl import _refuse_constant, iter_jsonl, read_records
from ppo_rlhf.data.records import (
    PairwiseRecord,
    PathLike,
    RankingRecord,
    RatingRecord,
    Record,
    Ties,
    _check_kind,
    _json_type,
    detect_kind,
    record_from_dict,
    record_to_dict,
)
from ppo_rlhf.errors import DataError

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
