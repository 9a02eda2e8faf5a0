"""Input checks shared by both backends' math and by `RolloutBatch.validate` (numpy only).

Shapes are checked on every call (they are static, even inside `jax.jit`). Mask *values* are
checked whenever they are concrete and cheap to read -- a JAX array outside of tracing, a torch
tensor on the CPU; inside `jit`, or on an accelerator where reading them would force a host sync,
they are trusted (each backend's `masked._bool_mask` decides). One mask checker for all:
`check_mask`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_same_shape(fn: str, ref_name: str, ref_shape: tuple, **others: Any) -> None:
    """Every array in `others` must have shape `ref_shape` (the shape of `ref_name`)."""
    ref_shape = tuple(ref_shape)
    for name, arr in others.items():
        if arr is None:
            continue
        shape = tuple(arr.shape)
        if shape != ref_shape:
            raise ValueError(f"{fn}: {name} has shape {shape}, but {ref_name} has shape {ref_shape}; "
                             f"they must match")


def check_leading_dim(fn: str, name: str, arr: Any, n: int) -> None:
    if tuple(arr.shape) != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},) (one per row), got {tuple(arr.shape)}")


def check_mask(what: str, mask: np.ndarray, *, layout: str | None = None,
               allow_all_zero: bool = False) -> None:
    """A mask holds only 0/1 (or bools). Without `layout`: at least one real token (unless
    `allow_all_zero`). With layout="left" / "right" (a [batch, time] mask of left-padded prompts
    / right-padded responses): every row has a real token, and the real tokens of a row are a
    contiguous suffix / prefix. ValueError starting with `what` otherwise."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        bad = (m != 0) & (m != 1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what} must hold only 0/1, found {m[where].item()!r} at {where}")
    if layout is None:
        if not allow_all_zero and not m.any():
            raise ValueError(f"{what} is all zeros: there is no real token to compute over")
        return
    if m.ndim != 2:
        raise ValueError(f"{what} must be 2-D [batch, time], got shape {m.shape}")
    m = m.astype(np.int32)
    empty = np.where(m.sum(axis=1) == 0)[0]
    if empty.size:
        raise ValueError(f"{what} has rows with no real token (rows {empty[:10].tolist()})")
    # A contiguous prefix is non-increasing along time; a contiguous suffix non-decreasing.
    d = np.diff(m, axis=1)
    bad_rows = np.where((d > 0).any(axis=1) if layout == "right" else (d < 0).any(axis=1))[0]
    if bad_rows.size:
        want = ("a contiguous prefix (right padding)" if layout == "right"
                else "a contiguous suffix (left padding)")
        raise ValueError(f"{what}: real tokens must form {want}; rows {bad_rows[:10].tolist()} do not")


def check_contiguous_rows(fn: str, mask: np.ndarray) -> None:
    """The real tokens of each row form one contiguous block (a prefix, a suffix or a middle run)."""
    m = (np.asarray(mask) != 0).astype(np.int8)
    starts = (np.diff(m, axis=-1, prepend=0) == 1).sum(axis=-1)
    bad = np.where(starts > 1)[0]
    if bad.size:
        raise ValueError(f"{fn}: the real tokens of each row must be one contiguous block; rows "
                         f"{bad[:10].tolist()} have gaps")


def check_choice(fn: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name}={value!r} is invalid: allowed "
                         + ", ".join(repr(c) for c in choices))


def check_groups(fn: str, scores: Any, num_generations: Any) -> None:
    """`scores` is 1-D [num_prompts * num_generations] (each prompt's samples adjacent) and
    `num_generations` an integer >= 1 that divides its length."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, (int, np.integer)) \
            or num_generations < 1:
        raise ValueError(f"{fn}: num_generations={num_generations!r} is invalid: allowed an integer >= 1")
    shape = tuple(scores.shape)
    if len(shape) != 1:
        raise ValueError(f"{fn}: scores must be 1-D [num_prompts * num_generations], got shape {shape}")
    if shape[0] == 0 or shape[0] % num_generations:
        raise ValueError(f"{fn}: scores has {shape[0]} entries, not a positive multiple of "
                         f"num_generations={num_generations} (each prompt's samples adjacent)")
