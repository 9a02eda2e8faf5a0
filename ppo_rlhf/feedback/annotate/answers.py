"""The answers of the JSON API: validating a `POST /api/label` body, and each annotator's order.

Every annotator sees an item's K responses in an order of their own (so that position carries no
information, and two annotators' position biases do not line up): `shown_order(salt, item_id,
annotator, k)`, a permutation drawn from a `random.Random` seeded with the string
"salt:item_id:annotator" (Python seeds from a string with SHA-512, so the order is the same in
every process, across restarts). `order[j]` is the ORIGINAL index of the response shown at
position j (0-based; the page numbers them 1..K).

A body names the item and the annotator and holds exactly one answer, in SHOWN indices:

  choose  {"choice": 0 | 1 | "tie"}
  rank    {"ranking": [2, [0, 3], 1]}   best to worst; a list inside is a group of ties, as in a
                                        ranking record (`ppo_rlhf.data`); every index once
  rate    {"ratings": [5, 2, ...]}      one integer 1..scale per response, in shown order
  any     {"skip": true}                not answered now, and not asked again

`parse_answer` checks it (raising `AnswerError`, a one-line message for an HTTP 400) and
`to_original` maps it back to the original indices, the form in which it is stored: choose -> the
original index or "tie"; rank -> tiers `[[i, ...], ...]` (each sorted); rate -> the ratings in
original order. These are the same answers, with the same meanings, as the terminal tool's
(`ppo_rlhf.feedback.terminal.parse_answer`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["AnswerError", "Answer", "parse_answer", "to_original", "shown_order",
           "check_annotator", "check_item_id", "MAX_NAME"]

MAX_NAME = 64
_ANSWER_KEY = {"choose": "choice", "rank": "ranking", "rate": "ratings"}


class AnswerError(ValueError):
    """A request the API refuses (HTTP 400); the message is one line, shown to the person."""


@dataclass(frozen=True)
class Answer:
    """A checked answer in SHOWN indices; `value` is None when `skipped`."""

    skipped: bool
    value: Any = None


def shown_order(salt: str, item_id: int, annotator: str, k: int) -> list[int]:
    """The permutation in which `annotator` sees item `item_id`'s `k` responses (see above)."""
    order = list(range(k))
    random.Random(f"{salt}:{item_id}:{annotator}").shuffle(order)
    return order


def check_annotator(name: Any) -> str:
    """An annotator's name: 1..64 printable characters, no spaces at either end."""
    if not isinstance(name, str) or not name:
        raise AnswerError('"annotator" must be a non-empty string (your name)')
    if len(name) > MAX_NAME:
        raise AnswerError(f'"annotator" is longer than {MAX_NAME} characters')
    if not name.isprintable() or name != name.strip():
        raise AnswerError('"annotator" must be printable, without spaces at either end')
    return name


def check_item_id(item_id: Any) -> int:
    if isinstance(item_id, bool) or not isinstance(item_id, int):
        raise AnswerError('"item_id" must be an integer')
    if not 1 <= item_id < 2 ** 63:  # item ids are SQLite's positive 64-bit row ids
        raise AnswerError(f"unknown item {item_id}" if abs(item_id) < 10 ** 30
                          else '"item_id" is out of range')
    return item_id


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_answer(body: Mapping[str, Any], mode: str, k: int, scale: int) -> Answer:
    """Check the answer part of a label request (everything but "item_id" and "annotator")."""
    key = _ANSWER_KEY[mode]
    unknown = sorted(set(body) - {"item_id", "annotator", "skip", key})
    if unknown:
        others = [m for m, kk in _ANSWER_KEY.items() if kk == unknown[0]]
        hint = f' (this server runs --mode {mode}: answer with "{key}")' if others else ""
        raise AnswerError(f'unknown field "{unknown[0]}"{hint}')
    if "skip" in body:
        if body["skip"] is not True:
            raise AnswerError('"skip" must be true')
        if key in body:
            raise AnswerError(f'give either "skip" or "{key}", not both')
        return Answer(True)
    if key not in body:
        raise AnswerError(f'the answer is missing: give "{key}" (mode {mode}) or "skip": true')
    value = body[key]
    if mode == "choose":
        return Answer(False, _check_choice(value, k))
    if mode == "rank":
        return Answer(False, _check_ranking(value, k))
    return Answer(False, _check_ratings(value, k, scale))


def _check_choice(value: Any, k: int) -> int | str:
    if value == "tie":
        return "tie"
    if not _is_int(value) or not 0 <= value < k:
        raise AnswerError(f'"choice" must be a response index 0..{k - 1} or "tie", '
                          f'got {value!r:.40}')
    return value


def _check_ranking(value: Any, k: int) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not value:
        raise AnswerError(f'"ranking" must be a list of the {k} response indices, best first')
    tiers: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for entry in value:
        group = entry if isinstance(entry, list) else [entry]
        if not group:
            raise AnswerError('"ranking" holds an empty group of ties')
        for i in group:
            if not _is_int(i) or not 0 <= i < k:
                raise AnswerError(f'"ranking" must hold response indices 0..{k - 1}, got {i!r:.40}')
            if i in seen:
                raise AnswerError(f'"ranking" lists response {i} twice: it must be a permutation')
            seen.add(i)
        tiers.append(tuple(group))
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise AnswerError(f'"ranking" is not a permutation of 0..{k - 1}: missing {missing}')
    return tuple(tiers)


def _check_ratings(value: Any, k: int, scale: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != k:
        raise AnswerError(f'"ratings" must be a list of {k} integers 1..{scale}, one per response')
    for v in value:
        if not _is_int(v) or not 1 <= v <= scale:
            raise AnswerError(f'"ratings" must be integers 1..{scale}, got {v!r:.40}')
    return tuple(value)


def to_original(mode: str, value: Any, order: list[int]) -> Any:
    """`value` (shown indices, as `parse_answer` returns it) in original indices, JSON-ready."""
    if mode == "choose":
        return value if value == "tie" else order[value]
    if mode == "rank":
        return [sorted(order[j] for j in tier) for tier in value]
    ratings = [0] * len(order)
    for j, v in enumerate(value):
        ratings[order[j]] = v
    return ratings
