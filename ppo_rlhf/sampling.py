"""Response samplers: where the labelling tool (and anything else that needs K responses per
prompt as text) gets its responses from.

A sampler is any object with `sample(prompts, k) -> list[list[str]]`: for each prompt, `k`
response strings (the response only, without the prompt). Two exist:

* `ResponsesFileSampler` -- pre-generated responses from a JSONL file of
  `{"prompt": ..., "responses": [...]}` records (`ppo-rlhf label --responses FILE`).
* `load_policy_sampler(backend, policy_dir, ...)` -- samples from a trained policy with the JAX or
  PyTorch generation code (`ppo-rlhf label --policy DIR --backend ...`).
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence, runtime_checkable

from ppo_rlhf.data import read_responses
from ppo_rlhf.errors import UsageError

BACKENDS = ("jax", "torch")


@runtime_checkable
class ResponseSampler(Protocol):
    """Anything that returns `k` responses (text, without the prompt) for each prompt."""

    def sample(self, prompts: list[str], k: int) -> list[list[str]]: ...


class ResponsesFileSampler:
    """Serves pre-generated responses: for each prompt, its first `k` responses in the file.

    The file is read once, into memory. Records with the same prompt are merged (their responses
    concatenated in file order). `prompts` lists the file's prompts in first-seen order.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = path
        self.responses: dict[str, list[str]] = {}
        for rec in read_responses(path):
            self.responses.setdefault(rec.prompt, []).extend(rec.responses)
        self.prompts = list(self.responses)

    def min_responses(self) -> int:
        """The fewest responses any prompt has (the largest k every prompt supports)."""
        return min(len(r) for r in self.responses.values())

    def sample(self, prompts: list[str], k: int) -> list[list[str]]:
        out = []
        for p in prompts:
            have = self.responses.get(p)
            if have is None:
                raise UsageError(f"{self.path}: no responses for the prompt {p!r}")
            if len(have) < k:
                raise UsageError(f"{self.path}: the prompt {p!r} has {len(have)} responses; "
                                 f"{k} are needed (lower --k)")
            out.append(list(have[:k]))
        return out


def check_sampled(prompts: Sequence[str], k: int, sampled: Any) -> list[list[str]]:
    """Check a sampler's answer: one list of exactly `k` strings per prompt."""
    if not isinstance(sampled, (list, tuple)) or len(sampled) != len(prompts):
        n = len(sampled) if isinstance(sampled, (list, tuple)) else type(sampled).__name__
        raise ValueError(f"sampler returned {n} results for {len(prompts)} prompts")
    out = []
    for p, rs in zip(prompts, sampled):
        if (not isinstance(rs, (list, tuple)) or len(rs) != k
                or not all(isinstance(r, str) for r in rs)):
            raise ValueError(f"sampler must return {k} strings per prompt; for {p!r} it "
                             f"returned {rs!r:.200}")
        out.append(list(rs))
    return out


def load_policy_sampler(backend: str, policy_dir: str | os.PathLike[str], *,
                        max_new_tokens: int = 24, temperature: float = 1.0,
                        seed: int = 0) -> ResponseSampler:
    """A `ResponseSampler` that samples from the policy checkpoint in `policy_dir` with the
    `backend` ("jax" or "torch") generation code.

    Expected behaviour: load the policy (model + tokenizer) saved in `policy_dir`; `sample(prompts,
    k)` tokenizes the prompts, draws `k` independent responses per prompt of at most
    `max_new_tokens` tokens at `temperature` (stopping at EOS), and returns them decoded without
    the prompt and without special tokens. Randomness comes from `seed` and advances between
    calls, so two calls never return the same draws and a run is reproducible. Bad arguments
    (a missing directory, a backend that is not installed) raise `UsageError`.
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    raise NotImplementedError("generation backend not wired yet")
