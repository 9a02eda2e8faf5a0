"""The machine's float32 matmul peak, measured (the denominator of 'fraction of peak' on CPU).

    python -m benchmarks.peak        # prints JSON: best GFLOP/s of JAX and torch, n x n matmuls
"""

from __future__ import annotations

import json
import time


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n: int = 2048, reps: int = 5) -> dict:
    flops = 2.0 * n ** 3
    out = {"n": n, "flops_per_matmul": flops}
    try:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        out["jax_gflops"] = flops / _best(lambda: mm(a).block_until_ready(), reps) / 1e9
    except ImportError:
        pass
    try:
        import torch

        t = torch.randn(n, n)
        out["torch_gflops"] = flops / _best(lambda: t @ t, reps) / 1e9
    except ImportError:
        pass
    out["peak_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
