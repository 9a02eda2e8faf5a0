"""The held-out split of preference data, by group: records of one prompt never straddle it.

A split by record leaks: an `annotate export --resolve all` writes one record per answer, so an
item answered by three annotators is three records, and synthetic or sampled preference data
often holds several pairs per prompt. Split by record, the same prompt (and often the same
responses) lands in both train and held-out, and the held-out accuracy is optimistic.

The group key is the record's **prompt** (the exact string). An annotation item is one prompt
(the database keeps prompts unique), so every record of an item -- every annotator's answer, and
every rating record of a rate-mode answer -- falls on the same side. `grouped_holdout_split`
holds out a seeded `round(fraction * G)` of the G groups (at least one when fraction > 0 and
G >= 2, never all of them); `train-rm`, the demo and the benchmarks that split data use it.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from ppo_rlhf.runtime.seeds import STREAM_HOLDOUT, rng

__all__ = ["group_key", "grouped_holdout_split"]


def group_key(record: Any) -> Hashable:
    """The group of a record (any kind with a `prompt`): its prompt."""
    return record.prompt


def grouped_holdout_split(keys: Sequence[Hashable], fraction: float,
                          seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train rows, held-out rows, held-out groups) for records with group keys `keys`: a seeded
    round(fraction * G) of the G distinct keys are held out with all their records (at least one
    when fraction > 0 and G >= 2, at most G - 1); rows sorted."""
    groups = list(dict.fromkeys(keys))  # first-appearance order: independent of hashing
    g = len(groups)
    n_eval = 0 if fraction <= 0 or g < 2 else min(g - 1, max(1, round(fraction * g)))
    perm = rng(seed, STREAM_HOLDOUT, 1).permutation(g)
    held = {groups[i] for i in perm[:n_eval].tolist()}
    is_eval = np.fromiter((k in held for k in keys), bool, count=len(keys))
    rows = np.arange(len(keys))
    return rows[~is_eval], rows[is_eval], n_eval
