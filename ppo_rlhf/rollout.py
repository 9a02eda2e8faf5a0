"""`RolloutBatch`: the exchange format between the backends.

One PPO rollout as plain numpy arrays, so that a rollout made by one backend can be fed to the
other (the full-step parity tests do exactly that) and saved to disk.

Layout (B samples, P prompt positions, R response positions):

  query_ids     int32  [B, P]  prompt tokens, LEFT-padded (pads first, then the prompt)
  query_mask    int32  [B, P]  1 on real prompt tokens: a contiguous suffix of each row
  response_ids  int32  [B, R]  sampled tokens, RIGHT-padded (response, then pads)
  response_mask int32  [B, R]  1 on real response tokens up to and including EOS: a contiguous,
                               non-empty prefix of each row; everything after EOS is 0
  logprobs      float32[B, R]  log pi_old(a_t|s_t) of the sampling policy (logits / temperature)
  ref_logprobs  float32[B, R]  log pi_ref(a_t|s_t) of the frozen reference (same temperature)
  values        float32[B, R]  V_old(s_t) of the critic at rollout time
  scores        float32[B]     reward(prompt, response), one per sample

Float arrays are float32 (`float_dtype="float64"` keeps them in float64: the rollouts of float64
models, for numerics checks).

`extras` holds any further per-sample arrays (leading dimension B), e.g. the gold score of the
demo task. Values at masked positions are ignored by every function of both backends (they may
even be NaN); use `RolloutBatch.validate()` to check everything at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ppo_rlhf.checks import check_mask  # also imported from here by generate

INT_FIELDS = ("query_ids", "query_mask", "response_ids", "response_mask")
FLOAT_TOKEN_FIELDS = ("logprobs", "ref_logprobs", "values")
ARRAY_FIELDS = INT_FIELDS + FLOAT_TOKEN_FIELDS + ("scores",)


def _to_numpy(x: Any) -> np.ndarray:
    """Any backend's array -> numpy, without importing a backend that is not already in use."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)  # jax.Array, lists, scalars


@dataclass
class RolloutBatch:
    query_ids: np.ndarray
    query_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    ref_logprobs: np.ndarray
    values: np.ndarray
    scores: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    float_dtype: str = "float32"
    """Of logprobs, ref_logprobs, values and scores: "float32", or "float64" (float64 models)."""

    def __post_init__(self) -> None:
        if self.float_dtype not in ("float32", "float64"):
            raise ValueError(f"RolloutBatch.float_dtype={self.float_dtype!r} is invalid: allowed "
                             f"'float32', 'float64'")
        for name in ARRAY_FIELDS:
            setattr(self, name, _to_numpy(getattr(self, name)))
        self.extras = {k: _to_numpy(v) for k, v in dict(self.extras).items()}
        self._check_shapes_and_dtypes()
        for name in INT_FIELDS:
            setattr(self, name, getattr(self, name).astype(np.int32, copy=False))
        for name in FLOAT_TOKEN_FIELDS + ("scores",):
            setattr(self, name, getattr(self, name).astype(self.float_dtype, copy=False))

    # ---- validation ----------------------------------------------------------------------------
    def _check_shapes_and_dtypes(self) -> None:
        for name in ARRAY_FIELDS:
            a = getattr(self, name)
            want_ndim = 1 if name == "scores" else 2
            if a.ndim != want_ndim:
                raise ValueError(f"RolloutBatch.{name} must be {want_ndim}-D, got shape {a.shape}")
            if name in INT_FIELDS:
                if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                    raise ValueError(f"RolloutBatch.{name} must be an integer array, got dtype {a.dtype}")
            elif not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"RolloutBatch.{name} must be a float array, got dtype {a.dtype}")
        b = self.query_ids.shape[0]
        if self.query_mask.shape != self.query_ids.shape:
            raise ValueError(f"RolloutBatch.query_mask shape {self.query_mask.shape} != "
                             f"query_ids shape {self.query_ids.shape}")
        r_shape = self.response_ids.shape
        for name in ("response_mask",) + FLOAT_TOKEN_FIELDS:
            if getattr(self, name).shape != r_shape:
                raise ValueError(f"RolloutBatch.{name} shape {getattr(self, name).shape} != "
                                 f"response_ids shape {r_shape}")
        if r_shape[0] != b:
            raise ValueError(f"RolloutBatch: batch sizes differ: query_ids has {b} rows, "
                             f"response_ids has {r_shape[0]}")
        if self.scores.shape != (b,):
            raise ValueError(f"RolloutBatch.scores must have shape ({b},), got {self.scores.shape}")
        for k, v in self.extras.items():
            if v.ndim == 0 or v.shape[0] != b:
                raise ValueError(f"RolloutBatch.extras[{k!r}] must have leading dimension {b}, "
                                 f"got shape {v.shape}")

    def validate(self) -> "RolloutBatch":
        """Check mask values and layouts, and that every real position holds a finite number.
        Returns self, so `RolloutBatch(...).validate()` reads naturally."""
        check_mask("RolloutBatch.query_mask", self.query_mask, layout="left")
        check_mask("RolloutBatch.response_mask", self.response_mask, layout="right")
        real = self.response_mask.astype(bool)
        for name in FLOAT_TOKEN_FIELDS:
            a = getattr(self, name)
            bad = np.argwhere(real & ~np.isfinite(a))
            if bad.size:
                raise ValueError(f"RolloutBatch.{name} is not finite at real position "
                                 f"{tuple(int(i) for i in bad[0])} ({len(bad)} such positions)")
        bad = np.where(~np.isfinite(self.scores))[0]
        if bad.size:
            raise ValueError(f"RolloutBatch.scores is not finite for samples {bad[:10].tolist()}")
        return self

    # ---- shape helpers -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.query_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.query_ids.shape[1])

    @property
    def response_len(self) -> int:
        return int(self.response_ids.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """All arrays (the fixed fields, then the extras) as one flat dict."""
        out = {name: getattr(self, name) for name in ARRAY_FIELDS}
        out.update(self.extras)
        return out

    def select(self, index: Any) -> "RolloutBatch":
        """Rows `index` (slice, int array or boolean mask) of every array."""
        return RolloutBatch(**{n: getattr(self, n)[index] for n in ARRAY_FIELDS},
                            extras={k: v[index] for k, v in self.extras.items()},
                            float_dtype=self.float_dtype)

    @classmethod
    def concatenate(cls, batches: list["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("RolloutBatch.concatenate needs at least one batch")
        keys = set(batches[0].extras)
        if any(set(b.extras) != keys for b in batches):
            raise ValueError("RolloutBatch.concatenate: batches have different extras")
        if len({b.float_dtype for b in batches}) > 1:
            raise ValueError("RolloutBatch.concatenate: batches have different float_dtype")
        return cls(**{n: np.concatenate([getattr(b, n) for b in batches]) for n in ARRAY_FIELDS},
                   extras={k: np.concatenate([b.extras[k] for b in batches]) for k in keys},
                   float_dtype=batches[0].float_dtype)

    # ---- backend conversion --------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], float_dtype: str = "float32") -> "RolloutBatch":
        """Build from a mapping of numpy / jax / torch arrays; keys beyond the fixed fields
        become extras."""
        missing = [n for n in ARRAY_FIELDS if n not in arrays]
        if missing:
            raise ValueError(f"RolloutBatch.from_arrays: missing field(s) {missing}")
        return cls(**{n: arrays[n] for n in ARRAY_FIELDS},
                   extras={k: v for k, v in arrays.items() if k not in ARRAY_FIELDS},
                   float_dtype=float_dtype)


    def to_jax(self) -> dict[str, Any]:
        """Every array as a jax.Array (int32 / float32), keyed by field name."""
        import jax.numpy as jnp

        return {k: jnp.asarray(v) for k, v in self.arrays().items()}

    def to_torch(self, device: Any = None) -> dict[str, Any]:
        """Every array as a torch.Tensor on `device`: token ids and masks int64 (what torch's
        embedding and gather want), floats float32."""
        import torch

        out = {}
        for k, v in self.arrays().items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            if k in INT_FIELDS:
                t = t.long()
            out[k] = t.to(device) if device is not None else t
        return out

    # ---- disk ----------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        arrays = {n: getattr(self, n) for n in ARRAY_FIELDS}
        arrays.update({f"extras__{k}": v for k, v in self.extras.items()})
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str) -> "RolloutBatch":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        extras = {k[len("extras__"):]: d.pop(k) for k in list(d) if k.startswith("extras__")}
        return cls(**d, extras=extras, float_dtype=str(d["logprobs"].dtype))

    def replace(self, **changes: Any) -> "RolloutBatch":
        return dataclasses.replace(self, **changes)
