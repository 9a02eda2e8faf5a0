"""From the annotation database to training data and agreement statistics.

`export_records(store, resolve, ties)` writes the record kinds `ppo-rlhf train-rm` reads (see
`ppo_rlhf.data`), built as the terminal tool builds them (`feedback.terminal.records_for`),
responses in their original order. Skips are never exported.

  resolve="all"       one record per answer (rate mode: K rating records per answer), with
                      extra fields "annotator" (the name), "time" (ISO 8601, UTC) and "item_id".
  resolve="majority"  one record per item that has answers (rate: K), with "annotator" (the list
                      of everyone who answered it), "time" (the latest answer), "item_id" and
                      "votes" (how many answers were combined):
                        choose: the most frequent of 0 / 1 / "tie"; a draw between them (e.g. one
                                vote each) is a tie record;
                        rank:   the responses ordered by their mean place (a tied group counts as
                                the mean of the places it spans; Borda); equal means are tied;
                        rate:   each response's median rating.
  ties="keep"         (default) tie records (choose) and tied groups (rank) are written as such:
                      `train-rm` drops them unless given `--ties keep`.
  ties="drop"         choose: tie records are left out; rank: a ranking tied throughout is left
                      out (partly tied rankings are kept: the trainer's --ties decides); rate:
                      nothing changes.

`agreement_stats(store)` counts answers per annotator and measures agreement (agreement.py).
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ppo_rlhf.data import Record, write_records
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.annotate.agreement import (
    annotator_agreement,
    cohen_kappas,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_agreement,
    units_for,
)
from ppo_rlhf.feedback.annotate.store import Store, StoredAnswer
from ppo_rlhf.feedback.terminal import records_for

__all__ = ["export_records", "write_export", "agreement_stats", "format_stats", "RESOLVE", "TIES"]

RESOLVE = ("all", "majority")
TIES = ("keep", "drop")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_records(store: Store, resolve: str = "all", ties: str = "keep") -> list[Record]:
    if resolve not in RESOLVE:
        raise UsageError(f"--resolve {resolve!r} is invalid: choose one of {', '.join(RESOLVE)}")
    if ties not in TIES:
        raise UsageError(f"--ties {ties!r} is invalid: choose one of {', '.join(TIES)}")
    items = store.items()
    by_item: dict[int, list[StoredAnswer]] = defaultdict(list)
    for a in store.answers():
        if not a.skipped:
            by_item[a.item_id].append(a)
    out: list[Record] = []
    for item_id in sorted(by_item):
        prompt, responses = items[item_id]
        answers = by_item[item_id]
        if resolve == "all":
            groups = [(a.value, {"annotator": a.annotator, "time": iso_time(a.time)})
                      for a in answers]
        else:
            groups = [(_majority(store.mode, [a.value for a in answers]),
                       {"annotator": [a.annotator for a in answers],
                        "time": iso_time(max(a.time for a in answers)), "votes": len(answers)})]
        for value, extra in groups:
            if ties == "drop" and _all_tied(store.mode, value):
                continue
            for rec in records_for(store.mode, prompt, responses, _label_value(store.mode, value)):
                rec.extra.update(extra, item_id=item_id)
                out.append(rec)
    return out


def _label_value(mode: str, value: Any) -> Any:
    """A stored value in the form `feedback.terminal.records_for` takes (rank: tuples of tiers)."""
    return tuple(tuple(t) for t in value) if mode == "rank" else value


def _all_tied(mode: str, value: Any) -> bool:
    return (mode == "choose" and value == "tie") or (mode == "rank" and len(value) == 1)


def _majority(mode: str, values: list[Any]) -> Any:
    if mode == "choose":
        counts = Counter(values).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            return "tie"
        return counts[0][0]
    if mode == "rank":
        places: dict[int, list[float]] = defaultdict(list)
        for tiers in values:
            start = 0
            for tier in tiers:
                mean_place = start + (len(tier) - 1) / 2
                for i in tier:
                    places[i].append(mean_place)
                start += len(tier)
        mean = {i: statistics.fmean(p) for i, p in places.items()}
        grouped: dict[float, list[int]] = defaultdict(list)
        for i in sorted(mean):
            grouped[round(mean[i], 9)].append(i)
        return [grouped[m] for m in sorted(grouped)]
    return [statistics.median(col) for col in zip(*values)]


def write_export(store: Store, out: str | Path, resolve: str = "all", ties: str = "keep") -> int:
    """Write the export to `out` (JSONL, overwritten); returns the number of records."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UsageError(f"the directory of --out {out} does not exist")
    records = export_records(store, resolve, ties)
    if not records:
        raise UsageError(f"{store.path} holds no answers to export yet")
    return write_records(out, records)


# ---- statistics ---------------------------------------------------------------------------

def agreement_stats(store: Store) -> dict[str, Any]:
    """Counts and agreement of a database, as a JSON-ready dict (see `format_stats`)."""
    answers = list(store.answers())
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"answered": 0, "skipped": 0})
    answered_by: dict[int, int] = Counter()
    for a in answers:
        per[a.annotator]["skipped" if a.skipped else "answered"] += 1
        if not a.skipped:
            answered_by[a.item_id] += 1
    units = units_for(store.mode, answers)
    agree, pairs = pairwise_agreement(units)
    by_annotator = annotator_agreement(units)
    metrics = ("interval", "ordinal") if store.mode == "rate" else ("nominal",)
    return {
        "mode": store.mode, "k": store.k,
        "items": store.num_items(),
        "items_answered": len(answered_by),
        "items_multi": sum(1 for n in answered_by.values() if n >= 2),
        "annotators": {name: {**c, "agree": by_annotator.get(name, (0, 0))[0],
                              "pairs": by_annotator.get(name, (0, 0))[1]}
                       for name, c in sorted(per.items())},
        "unit": {"choose": "item", "rank": "response pair", "rate": "rated response"}[store.mode],
        "units": sum(1 for v in units.values() if len(v) >= 2),
        "agreement": {"agree": agree, "pairs": pairs,
                      "rate": agree / pairs if pairs else None},
        "alpha": {m: krippendorff_alpha(units, m) for m in metrics},
        "fleiss_kappa": fleiss_kappa(units),
        "cohen_kappa": [{"annotators": list(pair), "kappa": kappa, "units": n}
                        for pair, (kappa, n) in cohen_kappas(units).items()],
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_stats(s: dict[str, Any], db: str | Path) -> str:
    lines = [f"{db}: mode {s['mode']}, K={s['k']}; {s['items']} items, {s['items_answered']} "
             f"answered, {s['items_multi']} by 2 or more annotators"]
    if s["annotators"]:
        width = max(9, *(len(n) for n in s["annotators"]))
        lines.append(f"{'annotator':<{width}}  answered  skipped  agreement with others")
        for name, c in s["annotators"].items():
            rate = _num(c["agree"] / c["pairs"]) if c["pairs"] else "n/a"
            lines.append(f"{name:<{width}}  {c['answered']:>8}  {c['skipped']:>7}  {rate} "
                         f"({c['pairs']} pairs)")
    a = s["agreement"]
    lines.append(f"pairwise agreement: {_num(a['rate'])} ({a['agree']} of {a['pairs']} annotator "
                 f"pairs agree, over {s['units']} {s['unit']}s judged by 2 or more)")
    for metric, alpha in s["alpha"].items():
        lines.append(f"Krippendorff's alpha ({metric}): {_num(alpha)}")
    lines.append(f"Fleiss' kappa{' (ratings as categories)' if s['mode'] == 'rate' else ''}: "
                 f"{_num(s['fleiss_kappa'])}")
    for c in s["cohen_kappa"]:
        a, b = c["annotators"]
        lines.append(f"Cohen's kappa {a} / {b}: {_num(c['kappa'])} ({c['units']} {s['unit']}s)")
    return "\n".join(lines)
