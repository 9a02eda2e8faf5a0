"""Responses to text prompts from a policy, in JAX: the one place that samples TEXT (evaluation,
the SFT trainer's samples, the labelling tools). Mirror: `ppo_torch/sample_text.py`.

    s = sample_texts(policy, tokenizer, ["a prompt", ...], max_new_tokens=32, temperature=0.7)
    s.texts                                   # one response per prompt, special tokens skipped

Prompts are tokenised as the PPO trainer does (`ppo_rlhf.tokens.tokenize_prompts`: no
special tokens, left padding) to `max_prompt_len`, or to a power-of-two bucket of the longest
(`ppo_rlhf.sampling.prompt_width`); they run in batches of `batch_size` (default: all at once),
the last one completed with copies so every batch has the same shape (one compilation);
generation (`ppo_jax.generate`) stops at the tokenizer's EOS. Batch b draws from the key
`sampling_seed(seed, stream, b)` (`ppo_rlhf.runtime.seeds`): reproducible, and independent
across streams (e.g. policy and reference samples of an evaluation).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from ppo_jax.generate import generate
from ppo_rlhf import tokens
from ppo_rlhf.runtime import seeds
from ppo_rlhf.sampling import TextSamples, prompt_width


def sample_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                 temperature: float = 1.0, seed: int = 0, stream: int = 0,
                 max_prompt_len: int | None = None, batch_size: int | None = None) -> TextSamples:
    """One response per prompt from `model` (a CausalLM); see the module docstring."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample_texts: no prompts")
    pad, eos = tokens.pad_and_eos(tokenizer)
    if max_prompt_len is None:
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        positions = model.config.max_position_embeddings if model.config.model_type == "gpt2" else None
        max_prompt_len = prompt_width(lengths, max_new_tokens, positions)
    size = batch_size or len(prompts)
    parts = []
    for b, start in enumerate(range(0, len(prompts), size)):
        chunk = prompts[start:start + size]
        q, qm, _ = tokens.tokenize_prompts(tokenizer, chunk + [chunk[-1]] * (size - len(chunk)),
                                           max_prompt_len)
        g = generate(model, q, qm, max_new_tokens=max_new_tokens, temperature=temperature,
                     eos_token_id=eos, pad_token_id=int(pad or 0),
                     key=jax.random.key(seeds.sampling_seed(seed, stream, b)))
        parts.append([x[:len(chunk)] for x in (q, qm, np.asarray(g.response_ids), np.asarray(g.response_mask))])
    q, qm, r, rm = (np.concatenate(xs) for xs in zip(*parts))
    return TextSamples(prompts, tokens.decode_responses(tokenizer, r, rm), q, qm, r, rm,
                       tokens.contains_eos(r, rm, eos))


__all__ = ["sample_texts"]
