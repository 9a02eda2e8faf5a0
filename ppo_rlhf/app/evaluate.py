"""`evaluate`: sample from a policy (and a reference) with a backend and compute the evaluation
numbers of `ppo_rlhf.eval.policy` -- what `ppo-rlhf eval` and the demo run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ppo_rlhf.app.backends import get_backend
from ppo_rlhf.errors import UsageError
from ppo_rlhf.eval.policy import EvalResult, summarize


def evaluate(backend: str, policy: str | os.PathLike, prompts: Sequence[str], *,
             reference: str | os.PathLike | None = None, reward_model: Any = None,
             gold: Callable | None = None, extra_rewards: Mapping[str, Callable] | None = None,
             max_prompt_len: int = 64, max_new_tokens: int = 32, temperature: float = 0.7,
             batch_size: int = 16, seed: int = 0,
             dtype: str = "float32") -> tuple[EvalResult, list[dict]]:
    """Sample from `policy` (and `reference`) with `backend` and compute the numbers above.
    Bad input -- a missing dir, a non-positive length / batch size / temperature, models or
    tokenizers that do not belong together (`ppo_rlhf.tokens.check_vocab`,
    `check_same_tokenizer`) -- is a UsageError before anything is loaded or sampled."""
    from ppo_rlhf.hf_checkpoint import read_config
    from ppo_rlhf.lora import adapter_base
    from ppo_rlhf.tokens import check_same_tokenizer, check_vocab, load_tokenizer

    dirs = {"policy": policy, "reference": reference,
            "reward model": reward_model if isinstance(reward_model, (str, os.PathLike)) else None}
    for name, path in dirs.items():
        if path is not None and not Path(path).is_dir():
            raise UsageError(f"{name} dir {str(path)!r} does not exist")
    for name, value in (("max_prompt_len", max_prompt_len), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            0 < temperature < float("inf")):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not prompts:
        raise UsageError("no prompts to evaluate")
    tokenizer = load_tokenizer(policy)
    for name in ("reference", "reward model"):
        check_same_tokenizer(tokenizer, dirs[name], name)
    check_vocab(tokenizer, {name: read_config(adapter_base(path) or path).get("vocab_size")  # a LoRA
                            for name, path in dirs.items() if path is not None})    # adapter: its base's
    s = get_backend(backend).sample_and_score(policy, list(prompts), reference=reference, reward_model=reward_model,
                             max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                             temperature=temperature, batch_size=batch_size, seed=seed,
                             dtype=dtype)
    return summarize(s, gold=gold, extra_rewards=extra_rewards)


__all__ = ["evaluate"]
