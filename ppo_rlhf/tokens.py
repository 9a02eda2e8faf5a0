"""Tokenizers and token ids on the host: loading, the checks every role must pass, prompts to
left-padded ids, responses back to text.

* `load_tokenizer(dir)`: a `transformers` tokenizer, or a one-line UsageError.
* `pad_and_eos(tokenizer)`: THE pad / EOS rule: pad is the tokenizer's pad token, or its EOS when
  it has none (as TRL); EOS may be None. Every trainer, sampler and encoder uses it.
* `check_vocab`, `check_same_tokenizer`, `check_positions`: models with another vocabulary or
  another tokenizer are refused (never re-tokenised through text), sequences must fit GPT-2's
  learned positions -- clear errors before anything is compiled.
* `tokenize_prompts`, `decode_responses`, `contains_eos`: the PPO rollout's host side.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ppo_rlhf.errors import UsageError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
REWARD_FN_HINT = ("to score with a reward model of another tokenizer, wrap it in a RewardFn that "
                  "re-tokenises the decoded text (docs/reliability.md)")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Does the directory `path` hold tokenizer files?"""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The `transformers` tokenizer saved in directory `path` (UsageError when there is none)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency of both extras
        raise UsageError(f"loading a tokenizer needs transformers: {e}") from None
    if not Path(path).is_dir():
        raise UsageError(f"tokenizer directory {str(path)!r} does not exist")
    if not has_tokenizer(path):
        # transformers 5 would build an EMPTY tokenizer from such a dir instead of failing
        raise UsageError(f"no tokenizer in {str(path)!r} (expected one of "
                         f"{', '.join(TOKENIZER_FILES)}); save one there with "
                         f"tokenizer.save_pretrained(dir) or pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None


def resolve_tokenizer(tokenizer: Any, model: Any) -> Any:
    """The tokenizer a trainer uses: `tokenizer` itself, or the one saved in that dir, or -- when
    None -- the one saved in the `model` checkpoint dir (None when the model is no dir)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if tokenizer is None and isinstance(model, (str, os.PathLike)):
        return load_tokenizer(model)
    return tokenizer


def pad_and_eos(tokenizer: Any) -> tuple[int | None, int | None]:
    """(pad id, EOS id): the pad token, or the EOS when the tokenizer has no pad token (as TRL);
    either may be None."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    return (eos if pad is None else pad), eos


# ---- checks --------------------------------------------------------------------------------------
def check_positions(need: int, what: str, fix: str, configs: Sequence[Any]) -> None:
    """Sequences of `need` tokens fit every model whose positions are learned embeddings (GPT-2:
    nothing past n_positions exists); UsageError naming `what` and the `fix` otherwise. Rotary
    models (Llama, Qwen2, NeoX) have no hard limit and are not checked."""
    for c in configs:
        if getattr(c, "model_type", None) != "gpt2":
            continue
        limit = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
        if limit is not None and need > int(limit):
            raise UsageError(f"{what} = {need} exceeds the model's n_positions={limit}: {fix}")


def check_vocab(tokenizer: Any, sizes: Mapping[str, int | None]) -> None:
    """All models share one vocabulary (`sizes`: role -> its vocab_size; None = unknown) and the
    tokenizer's ids fit in it. Roles are never re-tokenised through text: a model with another
    vocabulary is refused (UsageError)."""
    known = {role: int(n) for role, n in sizes.items() if n is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{role} {n}" for role, n in known.items())
        raise UsageError(f"the models have different vocabulary sizes ({listed}): they must share "
                         f"one tokenizer; {REWARD_FN_HINT}")
    if tokenizer is not None and known and len(tokenizer) > min(known.values()):
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{min(known.values())}: they do not belong together")


def check_same_tokenizer(tokenizer: Any, path: Any, role: str) -> None:
    """Refuse a `role` checkpoint dir that holds a tokenizer of its own which maps token ids to
    other tokens than `tokenizer` (the policy's): that model would read the policy's token ids
    as other text. A dir without tokenizer files is taken to share the policy's tokenizer (its
    vocabulary size is still checked, `check_vocab`)."""
    if (tokenizer is None or not hasattr(tokenizer, "get_vocab")
            or not isinstance(path, (str, os.PathLike)) or not has_tokenizer(path)):
        return
    ours = {i: t for t, i in tokenizer.get_vocab().items()}
    theirs = {i: t for t, i in load_tokenizer(path).get_vocab().items()}
    ids = set(ours) | set(theirs)
    differ = sum(ours.get(i) != theirs.get(i) for i in ids)
    if differ:
        hint = REWARD_FN_HINT if role == "reward model" else "use one that shares it"
        raise UsageError(f"the {role} {str(path)!r} has its own tokenizer, which differs from the "
                         f"policy's ({differ} of {len(ids)} token ids stand for other tokens): it "
                         f"would read the policy's tokens as other text; {hint}")


# ---- prompts in, responses out -------------------------------------------------------------------
def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int, *,
                     warn: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded int32 ids and mask [B, max_len] of `prompts`. A prompt longer than max_len is
    truncated FROM THE LEFT (its end, next to the response, is kept) with a warning; returns the
    number truncated too. Special tokens are not added (the tokenizer's BOS, if the model wants
    one, belongs in the prompt text or the tokenizer's post-processor)."""
    pad, _ = pad_and_eos(tokenizer)
    if pad is None:
        raise UsageError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    ids = np.full((len(prompts), max_len), pad, dtype=np.int32)
    mask = np.zeros((len(prompts), max_len), dtype=np.int32)
    truncated = 0
    for i, p in enumerate(prompts):
        toks = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not toks:
            raise UsageError(f"prompt {i} tokenizes to nothing: {p!r}")
        if len(toks) > max_len:
            truncated += 1
            toks = toks[-max_len:]
        ids[i, max_len - len(toks):] = toks
        mask[i, max_len - len(toks):] = 1
    if truncated and warn:
        warnings.warn(f"{truncated} of {len(prompts)} prompts are longer than max_prompt_len="
                      f"{max_len} tokens and were truncated from the left", stacklevel=2)
    return ids, mask, truncated


def decode_responses(tokenizer: Any, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    """Text of each response's real tokens (special tokens such as EOS skipped)."""
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(np.asarray(response_ids), np.asarray(response_mask))]


def contains_eos(response_ids: np.ndarray, response_mask: np.ndarray, eos_token_id: int | None) -> np.ndarray:
    """bool [B]: does the response end with EOS (inside its real tokens)."""
    if eos_token_id is None:
        return np.zeros(len(response_ids), dtype=bool)
    return ((np.asarray(response_ids) == eos_token_id) & (np.asarray(response_mask) != 0)).any(axis=1)


__all__ = ["TOKENIZER_FILES", "REWARD_FN_HINT", "has_tokenizer", "load_tokenizer", "resolve_tokenizer", "pad_and_eos",
           "check_positions", "check_vocab", "check_same_tokenizer", "tokenize_prompts",
           "decode_responses", "contains_eos"]
