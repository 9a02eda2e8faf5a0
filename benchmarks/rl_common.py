"""Pieces shared by the RL studies (`benchmarks.overoptimization`, `benchmarks.estimators`):
the held-out evaluator (KL to the initial policy and proxy score of a policy's own samples), the
config hash the result caches are keyed by, atomic result files and mean +- std over seeds."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_atomic(path: Path, text: str) -> None:
    from ppo_rlhf.runtime.checkpoints import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def mean_std(xs: Sequence[float | None]) -> dict[str, Any]:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


class Evaluator:
    """Samples one response per held-out prompt from a policy (in memory: no checkpoint round
    trip) and returns (per-response KL to pi_init, proxy scores, responses) -- the numbers of
    `ppo_rlhf.app.evaluate.evaluate`, through the same backend functions. With `proxy=None` (a
    task whose reward is a checker, not a model) the scores are NaN."""

    def __init__(self, backend: str, init_policy: Path, proxy: Path | None, prompts: list[str], *,
                 max_prompt_len: int, max_new_tokens: int, temperature: float, seed: int,
                 batch_size: int):
        import importlib

        from ppo_rlhf.app.backends import get_backend
        from ppo_rlhf.tokens import load_tokenizer

        self.backend, self.prompts = backend, prompts
        self.models = importlib.import_module(f"ppo_{backend}.models")  # + the scoring functions
        self.sample_texts = get_backend(backend).sample_texts
        self.tokenizer = load_tokenizer(init_policy)
        self.reference = self.models.load_pretrained(init_policy)
        self.proxy = None if proxy is None else self.models.load_scalar_model(proxy)
        self.kw = dict(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, stream=0, batch_size=batch_size)
        self.batch_size, self.temperature = batch_size, temperature
        if backend == "jax":
            import jax

            self._lp = jax.jit(self.models.response_logprobs, static_argnames=("temperature",))
            self._score = jax.jit(self.models.sequence_scores)

    def _chunks(self, s: Any) -> list[tuple[int, list[Any]]]:
        keys = ("query_ids", "query_mask", "response_ids", "response_mask")
        if self.backend == "jax":
            return [(n, [c[k] for k in keys]) for n, c in s.chunks(self.batch_size)]
        import torch

        return [(n, [torch.from_numpy(c[k]).long() for k in keys]) for n, c in s.chunks(self.batch_size)]

    def __call__(self, policy: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
        s = self.sample_texts(policy, self.tokenizer, self.prompts, **self.kw)
        chunks = self._chunks(s)
        if self.backend == "jax":
            lp = lambda m, a: np.asarray(self._lp(m, *a, temperature=self.temperature)).sum(1)
            score = lambda a: np.asarray(self._score(self.proxy, *a))
        else:
            import torch

            def lp(m, a):
                with torch.no_grad():
                    return self.models.response_logprobs(m, *a, temperature=self.temperature).sum(1).numpy()

            def score(a):
                with torch.no_grad():
                    return self.models.sequence_scores(self.proxy, *a).numpy()
        kl = np.concatenate([(lp(policy, a).astype(np.float64) - lp(self.reference, a))[:n] for n, a in chunks])
        if self.proxy is None:
            scores = np.full(len(kl), np.nan)
        else:
            scores = np.concatenate([score(a)[:n] for n, a in chunks]).astype(np.float64)
        return kl, scores, s.texts
