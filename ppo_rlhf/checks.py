"""Input checks shared by both backends' math (numpy only).

Shapes are checked on every call (they are static, even inside `jax.jit`). Mask *values* are
checked whenever they are concrete and cheap to read -- a JAX array outside of tracing, a torch
tensor on the CPU; inside `jit`, or on an accelerator where reading them would force a host sync,
they are trusted. See each backend's `_concrete_mask`.
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


def check_mask_values(fn: str, mask: np.ndarray, *, allow_all_zero: bool = False) -> None:
    """A mask holds only 0/1 (or bools) and, unless allowed, has at least one real token."""
    if mask.dtype != np.bool_:
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{fn}: mask must hold only 0/1, found {mask[where].item()!r} at {where}")
    if not allow_all_zero and not mask.any():
        raise ValueError(f"{fn}: mask is all zeros: there is no real token to compute over")


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
