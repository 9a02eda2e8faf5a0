"""Inter-annotator agreement: the pairwise agreement rate, Krippendorff's alpha, Fleiss' kappa and
Cohen's kappa per annotator pair.

Both work on *units*: one thing that several annotators judged, with one value per annotator
(`{unit: {annotator: value}}`); units with fewer than two values are not pairable and are ignored.

* `pairwise_agreement(units)`: over every unordered pair of annotators on every unit, the share
  whose values are equal -- `(agreeing pairs, pairs)`.
* `krippendorff_alpha(units, metric)`: `alpha = 1 - D_o / D_e` (Krippendorff, "Computing
  Krippendorff's Alpha-Reliability", 2011). From the coincidence matrix
  `o_ck = sum_u (number of ordered c-k value pairs from different annotators in u) / (m_u - 1)`,
  with `n_c = sum_k o_ck` and `n = sum_c n_c`:
  `D_o = sum_ck o_ck d2(c, k) / n`, `D_e = sum_ck n_c n_k d2(c, k) / (n (n - 1))`.
  Metrics: "nominal" d2 = [c != k]; "interval" d2 = (c - k)^2; "ordinal"
  d2 = (sum_{g between c and k} n_g - (n_c + n_k) / 2)^2. Alpha is 1 for perfect agreement, 0
  for agreement at chance level, negative below it; None when D_e = 0 (one value throughout:
  nothing to tell apart) or no unit is pairable.

* `fleiss_kappa(units)` (Fleiss 1971, nominal categories; units may have different numbers of
  annotators): per unit `P_u = (sum_c n_uc^2 - n_u) / (n_u (n_u - 1))`, `P_o` = the mean of P_u
  over pairable units, `p_c = sum_u n_uc / sum_u n_u`, `P_e = sum_c p_c^2`,
  `kappa = (P_o - P_e) / (1 - P_e)`; None when P_e = 1 or no unit is pairable.
* `cohen_kappas(units)` (Cohen 1960): for each pair of annotators, over the units both judged,
  `p_o` = the share they agree on, `p_e = sum_c p_a(c) p_b(c)` from each one's own category shares
  on those units, `kappa = (p_o - p_e) / (1 - p_e)` -> `{(a, b): (kappa or None, units)}`, a < b.

`units_for(mode, answers)` builds the units of each labelling mode from stored answers:
choose -> one unit per item, nominal values 0 / 1 / "tie"; rank -> one unit per item and pair of
responses (i < j), nominal values "i" / "j" / "tie" (who is ranked higher); rate -> one unit per
item and response, the rating (interval and ordinal).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any, Hashable, Iterable, Mapping

__all__ = ["krippendorff_alpha", "pairwise_agreement", "units_for", "annotator_agreement",
           "fleiss_kappa", "cohen_kappas"]

Units = Mapping[Hashable, Mapping[str, Any]]


def _pairable(units: Units) -> list[list[Any]]:
    return [list(values.values()) for values in units.values() if len(values) >= 2]


def pairwise_agreement(units: Units) -> tuple[int, int]:
    """(agreeing annotator pairs, annotator pairs) over all units."""
    agree = total = 0
    for values in _pairable(units):
        for a, b in itertools.combinations(values, 2):
            total += 1
            agree += a == b
    return agree, total


def annotator_agreement(units: Units) -> dict[str, tuple[int, int]]:
    """For each annotator: (pairs with another annotator on the same unit that agree, pairs)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for values in units.values():
        for (a, va), (b, vb) in itertools.combinations(values.items(), 2):
            for who in (a, b):
                out[who][0] += va == vb
                out[who][1] += 1
    return {who: (n[0], n[1]) for who, n in out.items()}


def krippendorff_alpha(units: Units, metric: str = "nominal") -> float | None:
    """Krippendorff's alpha of `units` under `metric` ("nominal", "ordinal" or "interval")."""
    if metric not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"metric={metric!r} is invalid: allowed 'nominal', 'ordinal', 'interval'")
    coincidence: Counter = Counter()
    for values in _pairable(units):
        m = len(values)
        for i, j in itertools.permutations(range(m), 2):
            coincidence[values[i], values[j]] += 1.0 / (m - 1)
    if not coincidence:
        return None
    n_c: Counter = Counter()
    for (c, _k), o in coincidence.items():
        n_c[c] += o
    n = sum(n_c.values())
    categories = sorted(n_c) if metric != "nominal" else list(n_c)
    d2 = _distance(metric, categories, n_c)
    d_o = sum(o * d2(c, k) for (c, k), o in coincidence.items()) / n
    d_e = sum(n_c[c] * n_c[k] * d2(c, k) for c in categories for k in categories) / (n * (n - 1))
    if d_e == 0:
        return None
    return 1.0 - d_o / d_e


def fleiss_kappa(units: Units) -> float | None:
    """Fleiss' kappa of `units` (nominal values; see the module docstring)."""
    per_unit = [Counter(_hashable(v) for v in values) for values in _pairable(units)]
    if not per_unit:
        return None
    p_o = sum((sum(n * n for n in c.values()) - sum(c.values()))
              / (sum(c.values()) * (sum(c.values()) - 1)) for c in per_unit) / len(per_unit)
    totals: Counter = Counter()
    for c in per_unit:
        totals.update(c)
    n = sum(totals.values())
    p_e = sum((t / n) ** 2 for t in totals.values())
    return None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def cohen_kappas(units: Units) -> dict[tuple[str, str], tuple[float | None, int]]:
    """Cohen's kappa of every pair of annotators who judged a unit in common."""
    shared: dict[tuple[str, str], list[tuple[Any, Any]]] = defaultdict(list)
    for values in units.values():
        for a, b in itertools.combinations(sorted(values), 2):
            shared[a, b].append((_hashable(values[a]), _hashable(values[b])))
    out = {}
    for pair, rows in sorted(shared.items()):
        m = len(rows)
        p_o = sum(x == y for x, y in rows) / m
        ca, cb = Counter(x for x, _ in rows), Counter(y for _, y in rows)
        p_e = sum(ca[c] * cb[c] for c in ca) / (m * m)
        out[pair] = (None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e), m)
    return out


def _hashable(v: Any) -> Hashable:
    return tuple(map(_hashable, v)) if isinstance(v, list) else v


def _distance(metric: str, categories: list[Any], n_c: Mapping[Any, float]):
    if metric == "nominal":
        return lambda c, k: float(c != k)
    if metric == "interval":
        return lambda c, k: float(c - k) ** 2
    rank = {c: i for i, c in enumerate(categories)}
    cumulative = list(itertools.accumulate(n_c[c] for c in categories))

    def ordinal(c: Any, k: Any) -> float:
        lo, hi = sorted((rank[c], rank[k]))
        between = cumulative[hi] - (cumulative[lo - 1] if lo > 0 else 0.0)
        return (between - (n_c[c] + n_c[k]) / 2) ** 2

    return ordinal


def units_for(mode: str, answers: Iterable[Any]) -> dict[Hashable, dict[str, Any]]:
    """The agreement units of `mode` from stored answers (`store.StoredAnswer`; skips ignored)."""
    units: dict[Hashable, dict[str, Any]] = defaultdict(dict)
    for a in answers:
        if a.skipped:
            continue
        if mode == "choose":
            units[a.item_id][a.annotator] = a.value
        elif mode == "rank":
            place = {i: t for t, tier in enumerate(a.value) for i in tier}
            for i, j in itertools.combinations(sorted(place), 2):
                units[a.item_id, i, j][a.annotator] = (
                    "tie" if place[i] == place[j] else str(i) if place[i] < place[j] else str(j))
        elif mode == "rate":
            for i, r in enumerate(a.value):
                units[a.item_id, i][a.annotator] = r
        else:
            raise ValueError(f"mode={mode!r} is invalid")
    return dict(units)
