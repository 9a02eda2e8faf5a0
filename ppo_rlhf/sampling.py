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
from ppo_rlhf.backends import backend_module, check_backend
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


def _bucket(n: int) -> int:
    """Prompt-length bucket: the next power of two >= n (at least 16), so the JAX backend compiles
    one generation program per bucket instead of one per longest-prompt length."""
    return max(16, 1 << (int(n) - 1).bit_length())


class PolicySampler:
    """Samples responses from a policy checkpoint with `ppo_jax.generate` or `ppo_torch.generate`;
    build it with `load_policy_sampler`.

    Prompts are tokenized as the PPO trainer does (`ppo_rlhf.loop.tokenize_prompts`: no special
    tokens added, left padding) to a power-of-two length bucket; each prompt is repeated `k`
    times in one batch; generation stops at the tokenizer's EOS; responses are decoded without
    special tokens (`ppo_rlhf.loop.decode_responses`). The random state (a jax.random key / a
    torch.Generator seeded with `seed`) advances with every call."""

    def __init__(self, backend: str, policy_dir: str | os.PathLike[str], *, max_new_tokens: int,
                 temperature: float, seed: int):
        from pathlib import Path

        check_backend(backend)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
            raise UsageError(f"temperature must be a number > 0, got {temperature!r}")
        path = Path(policy_dir)
        if not path.is_dir():
            raise UsageError(f"policy {str(path)!r}: not a directory")
        from ppo_rlhf.trainer_common import TOKENIZER_FILES, has_tokenizer, load_tokenizer

        if not has_tokenizer(path):
            # transformers 5 would build an EMPTY tokenizer from config.json alone
            raise UsageError(f"policy {str(path)!r}: no tokenizer saved there (none of "
                             f"{', '.join(TOKENIZER_FILES)})")

        self.backend, self.path = backend, path
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self.tokenizer = load_tokenizer(path)
        tok = self.tokenizer
        self.eos_token_id = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_token_id = 0 if pad is None else int(pad)
        generate = backend_module(backend, "generate").generate
        load_pretrained = backend_module(backend, "models").load_pretrained
        try:
            if backend == "jax":
                import jax

                self.model = load_pretrained(path)
                self.max_positions = self.model.config.max_position_embeddings
                self._key = jax.random.key(int(seed))
            else:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
                self.model = load_pretrained(path).to(device)
                self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
                self._generator = torch.Generator(device=device).manual_seed(int(seed))
        except (OSError, ValueError) as e:  # FileNotFoundError included: no config / weights
            raise UsageError(f"cannot load a policy from {str(path)!r}: {e}") from None
        from ppo_rlhf.trainer_common import check_vocab

        check_vocab(self.tokenizer, {"policy": self.model.config.vocab_size})
        self._generate = generate

    def _draw(self, q: Any, qm: Any) -> tuple[Any, Any]:
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                  eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        if self.backend == "jax":
            import jax
            import numpy as np

            self._key, key = jax.random.split(self._key)
            out = self._generate(self.model, q, qm, key=key, **kw)
            return np.asarray(out.response_ids), np.asarray(out.response_mask)
        out = self._generate(self.model, q, qm, generator=self._generator, **kw)
        return out.response_ids.cpu().numpy(), out.response_mask.cpu().numpy()

    def sample(self, prompts: list[str], k: int) -> list[list[str]]:
        from ppo_rlhf.loop import decode_responses, tokenize_prompts

        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"k (responses per prompt) must be an int >= 1, got {k!r}")
        prompts = list(prompts)
        if not prompts:
            return []
        texts = [p for p in prompts for _ in range(k)]
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        longest = max(lengths)
        if self.max_positions is not None and longest + self.max_new_tokens > self.max_positions:
            i = lengths.index(longest)
            raise UsageError(f"the prompt {prompts[i]!r:.80} has {longest} tokens; with "
                             f"--max-new-tokens {self.max_new_tokens} that passes the model's "
                             f"{self.max_positions} positions")
        width = _bucket(longest)
        if self.max_positions is not None:  # left pads take cache slots too (GPT-2 checks them)
            width = min(width, self.max_positions - self.max_new_tokens)
        q, qm, _ = tokenize_prompts(self.tokenizer, texts, width)
        ids, mask = self._draw(q, qm)
        decoded = decode_responses(self.tokenizer, ids, mask)
        return [decoded[i * k:(i + 1) * k] for i in range(len(prompts))]


def load_policy_sampler(backend: str, policy_dir: str | os.PathLike[str], *,
                        max_new_tokens: int = 64, temperature: float = 1.0,
                        seed: int = 0) -> ResponseSampler:
    """A `ResponseSampler` that samples from the policy checkpoint in `policy_dir` with the
    `backend` ("jax" or "torch") generation code.

    Loads the policy (model + tokenizer, `transformers.AutoTokenizer`) saved in `policy_dir`;
    `sample(prompts, k)` tokenizes the prompts (left padding, as the PPO trainer does), draws `k`
    independent responses per prompt of at most `max_new_tokens` tokens at `temperature`
    (stopping at the tokenizer's EOS; no top-k / top-p), and returns them decoded without the
    prompt and without special tokens. Randomness comes from `seed` and advances between calls,
    so two calls never return the same draws and a run is reproducible. Bad arguments (a
    missing directory, no tokenizer or model in it, a backend that is not installed, a prompt
    too long for the model) raise `UsageError`. See `PolicySampler`.
    """
    check_backend(backend)
    return PolicySampler(backend, policy_dir, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
