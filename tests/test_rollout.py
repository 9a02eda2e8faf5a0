"""RolloutBatch: shapes, dtypes and masks validated with clear errors; conversions both ways."""

from __future__ import annotations

import numpy as np
import pytest

from ppo_rlhf import RolloutBatch


def make(b=3, p=4, r=5, **over):
    rng = np.random.default_rng(0)
    qlen, rlen = np.array([4, 2, 1])[:b], np.array([5, 3, 1])[:b]
    d = dict(
        query_ids=rng.integers(0, 50, (b, p)),
        query_mask=(np.arange(p)[None] >= p - qlen[:, None]).astype(np.int64),
        response_ids=rng.integers(0, 50, (b, r)),
        response_mask=(np.arange(r)[None] < rlen[:, None]),
        logprobs=rng.normal(size=(b, r)), ref_logprobs=rng.normal(size=(b, r)),
        values=rng.normal(size=(b, r)), scores=rng.normal(size=b),
    )
    d.update(over)
    return RolloutBatch(**d)


def test_normalises_dtypes_and_validates():
    rb = make().validate()
    assert rb.query_ids.dtype == np.int32 and rb.response_mask.dtype == np.int32
    assert rb.logprobs.dtype == np.float32 and rb.scores.dtype == np.float32
    assert (rb.batch_size, rb.prompt_len, rb.response_len) == (3, 4, 5)
    # float64 arrays become float32 (the format) unless float64 is asked for (float64 models)
    assert make(logprobs=np.zeros((3, 5))).logprobs.dtype == np.float32
    rb64 = make(float_dtype="float64")
    assert rb64.logprobs.dtype == rb64.values.dtype == rb64.scores.dtype == np.float64
    assert rb64.select([0, 1]).float_dtype == "float64"
    with pytest.raises(ValueError, match="float_dtype"):
        make(float_dtype="float16")


@pytest.mark.parametrize("over,message", [
    (dict(values=np.zeros((3, 4))), r"RolloutBatch.values shape \(3, 4\) != response_ids shape \(3, 5\)"),
    (dict(scores=np.zeros(2)), r"RolloutBatch.scores must have shape \(3,\)"),
    (dict(query_ids=np.zeros((3, 4), np.float32)), r"RolloutBatch.query_ids must be an integer array"),
    (dict(logprobs=np.zeros((3, 5), np.int32)), r"RolloutBatch.logprobs must be a float array"),
    (dict(query_mask=np.zeros((3, 3), np.int32)), r"query_mask shape \(3, 3\) != query_ids shape \(3, 4\)"),
    (dict(scores=np.zeros((3, 1))), r"RolloutBatch.scores must be 1-D"),
])
def test_shape_and_dtype_errors(over, message):
    with pytest.raises(ValueError, match=message):
        make(**over)


def test_mask_errors():
    m = make().response_mask.copy()
    m[0, 1] = 2
    with pytest.raises(ValueError, match=r"response_mask must hold only 0/1, found 2 at \(0, 1\)"):
        make(response_mask=m).validate()
    m = make().response_mask.copy()
    m[2, :] = 0
    with pytest.raises(ValueError, match=r"response_mask has rows with no real token \(rows \[2\]\)"):
        make(response_mask=m).validate()
    m = make().response_mask.copy()
    m[0, 2] = 0  # a hole: not a prefix
    with pytest.raises(ValueError, match=r"contiguous prefix \(right padding\); rows \[0\]"):
        make(response_mask=m).validate()
    q = make().query_mask.copy()
    q[1] = [1, 1, 0, 0]  # right-padded prompt
    with pytest.raises(ValueError, match=r"contiguous suffix \(left padding\); rows \[1\]"):
        make(query_mask=q).validate()


def test_nan_only_allowed_on_padding():
    lp = make().logprobs.copy()
    lp[1, 4] = np.nan  # padding of row 1 (3 real tokens)
    make(logprobs=lp).validate()
    lp[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"RolloutBatch.logprobs is not finite at real position \(1, 0\)"):
        make(logprobs=lp).validate()


def test_backend_conversions_round_trip(tmp_path):
    import torch

    rb = make(extras={"gold": np.arange(3.0)})
    j = rb.to_jax()
    assert j["query_ids"].dtype.name == "int32" and j["logprobs"].dtype.name == "float32"
    back = RolloutBatch.from_arrays(j)
    t = rb.to_torch()
    assert t["response_ids"].dtype == torch.int64 and t["values"].dtype == torch.float32
    back2 = RolloutBatch.from_arrays(t)
    for other in (back, back2, RolloutBatch.load(_save(rb, tmp_path))):
        for k, v in rb.arrays().items():
            np.testing.assert_array_equal(other.arrays()[k], v)
            if k != "gold":  # extras keep whatever dtype the backend gave (jax: float32)
                assert other.arrays()[k].dtype == v.dtype


def _save(rb, tmp_path):
    path = str(tmp_path / "rb.npz")
    rb.save(path)
    return path


def test_select_and_concatenate():
    rb = make()
    parts = [rb.select(slice(0, 1)), rb.select(np.array([1, 2]))]
    again = RolloutBatch.concatenate(parts)
    np.testing.assert_array_equal(again.response_ids, rb.response_ids)
    with pytest.raises(ValueError, match="missing field"):
        RolloutBatch.from_arrays({"query_ids": rb.query_ids})
