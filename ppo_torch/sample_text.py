"""Responses to text prompts from a policy, in PyTorch: the one place that samples TEXT (evaluation,
the SFT trainer's samples, the labelling tools). Mirror: `ppo_jax/sample_text.py`.

    s = sample_texts(policy, tokenizer, ["a prompt", ...], max_new_tokens=32, temperature=0.7)
    s.texts                                   # one response per prompt, special tokens skipped

Prompts are tokenised as the PPO trainer does (`ppo_rlhf.tokens.tokenize_prompts`: no
special tokens, left padding) to `max_prompt_len`, or to a power-of-two bucket of the longest
(`ppo_rlhf.sampling.prompt_width`); they run in batches of `batch_size` (default: all at once),
the last one completed with copies so every batch has the same shape (one compilation);
generation (`ppo_torch.generate`) stops at the tokenizer's EOS. Batch b draws from a torch.Generator seeded with
`sampling_seed(seed, stream, b)` (`ppo_rlhf.runtime.seeds`): reproducible, and independent
across streams (e.g. policy and reference samples of an evaluation).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ppo_rlhf import tokens
from ppo_rlhf.runtime import seeds
from ppo_rlhf.sampling import TextSamples, prompt_width
from ppo_torch.generate import generate


def sample_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                 temperature: float = 1.0, seed: int = 0, stream: int = 0,
                 max_prompt_len: int | None = None, batch_size: int | None = None) -> TextSamples:
    """One response per prompt from `model` (a CausalLM, on its device); see the module
    docstring."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample_texts: no prompts")
    pad, eos = tokens.pad_and_eos(tokenizer)
    if max_prompt_len is None:
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        positions = getattr(model.config, "n_positions", None) if model.config.model_type == "gpt2" else None
        max_prompt_len = prompt_width(lengths, max_new_tokens, positions)
    size = batch_size or len(prompts)
    parts = []
    for b, start in enumerate(range(0, len(prompts), size)):
        chunk = prompts[start:start + size]
        q, qm, _ = tokens.tokenize_prompts(tokenizer, chunk + [chunk[-1]] * (size - len(chunk)),
                                           max_prompt_len)
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seeds.sampling_seed(seed, stream, b))
        with torch.no_grad():
            g = generate(model, torch.from_numpy(q).long().to(device), torch.from_numpy(qm).long().to(device),
                         max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos,
                         pad_token_id=int(pad or 0), generator=gen)
        parts.append([x[:len(chunk)] for x in (q, qm, g.response_ids.cpu().numpy(),
                                               g.response_mask.cpu().numpy())])
    q, qm, r, rm = (np.concatenate(xs) for xs in zip(*parts))
    return TextSamples(prompts, tokens.decode_responses(tokenizer, r, rm), q, qm, r, rm,
                       tokens.contains_eos(r, rm, eos))


__all__ = ["sample_texts"]
