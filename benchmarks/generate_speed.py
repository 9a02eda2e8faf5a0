"""Decode speed of `ppo_jax.generate` vs `ppo_torch.generate` on small random GPT-2 checkpoints.

    python -m benchmarks.generate_speed                      # tiny (2x64) and ~1M-param (4x128) GPT-2
    python -m benchmarks.generate_speed --batch 32 --new-tokens 256 --repeats 7

Fixed-length responses (eos_token_id=None), sampling at temperature 1 with a key / generator.
Reports the JAX compile time (first call) apart, then the median wall time of `--repeats`
warm calls (blocked on the result) for each backend, measured alternately in one process, and
B * new_tokens / median as tokens/s (prefill of the short prompt included).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

MODELS = {
    "tiny-gpt2 (2x64)": dict(),
    "gpt2-1M (4x128)": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=1024),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    args = ap.parse_args()

    import jax
    import torch

    import ppo_jax.models as jm
    import ppo_torch.models as tm
    from ppo_jax.generate import generate as jgen
    from ppo_rlhf.testing import make_padded_batch, make_tiny_checkpoint
    from ppo_torch.generate import generate as tgen

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    print(f"B={B} P={P} N={N} jax {jax.__version__} ({jax.default_backend()}), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'model':<18} {'params':>8} {'jax compile s':>14} {'jax tok/s':>10} {'torch tok/s':>12} "
          f"{'jax/torch':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in MODELS.items():
            vocab = kw.pop("vocab_size", 512)
            path = make_tiny_checkpoint(f"{tmp}/{len(name)}", "gpt2", vocab_size=vocab, **kw)
            jl, tl = jm.load_pretrained(path), tm.load_pretrained(path)
            params = sum(p.numel() for p in tl.parameters())
            q, qm, _, _ = make_padded_batch(0, B, P, 1, vocab)
            key = jax.random.key(0)
            t0 = time.perf_counter()
            jax.block_until_ready(jgen(jl, q, qm, max_new_tokens=N, key=key))
            compile_s = time.perf_counter() - t0
            g = torch.Generator().manual_seed(0)
            tgen(tl, q, qm, max_new_tokens=N, generator=g)  # warm-up
            times = {"jax": [], "torch": []}
            for i in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(jgen(jl, q, qm, max_new_tokens=N, key=jax.random.fold_in(key, i)))
                times["jax"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tgen(tl, q, qm, max_new_tokens=N, generator=g)
                times["torch"].append(time.perf_counter() - t0)
            tps = {k: B * N / statistics.median(v) for k, v in times.items()}
            print(f"{name:<18} {params / 1e6:>7.2f}M {compile_s:>14.2f} {tps['jax']:>10.0f} "
                  f"{tps['torch']:>12.0f} {tps['jax'] / tps['torch']:>9.1f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
