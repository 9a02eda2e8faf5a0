"""Response samplers: where the labelling tool (and anything else that needs K responses per
prompt as text) gets its responses from.

A sampler is any object with `sample(prompts, k) -> list[list[str]]`: for each prompt, `k`
response strings (the response only, without the prompt). Two exist:

* `ResponsesFileSampler` -- pre-generated responses from a JSONL file of
  `{"prompt": ..., "responses": [...]}` records (`ppo-rlhf label --responses FILE`).
* `PolicySampler` -- samples from a trained policy with the JAX or PyTorch generation code
  (`ppo-rlhf label --policy DIR --backend ...`; built by `ppo_rlhf.app.backends.load_policy_sampler`,
  the layer that picks a backend).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ppo_rlhf.data import read_responses
from ppo_rlhf.errors import UsageError


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


class PolicySampler:
    """K responses per prompt from a policy: `draw(prompts, call)` returns one response per prompt
    (a backend's `sample_text.sample_texts`, bound to a model and a tokenizer by
    `ppo_rlhf.app.backends.load_policy_sampler`); each prompt is repeated `k` times in one draw,
    and `call` (0, 1, 2, ...) picks a fresh random stream for every call, so two calls never
    return the same draws and a run is reproducible from its seed."""

    def __init__(self, draw: Callable[[list[str], int], list[str]], *, eos_token_id: int | None = None):
        self._draw, self.eos_token_id, self._calls = draw, eos_token_id, 0

    def sample(self, prompts: list[str], k: int) -> list[list[str]]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"k (responses per prompt) must be an int >= 1, got {k!r}")
        prompts = list(prompts)
        if not prompts:
            return []
        texts = self._draw([p for p in prompts for _ in range(k)], self._calls)
        self._calls += 1
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
