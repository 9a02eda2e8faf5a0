"""Sample and score for evaluation (PyTorch). Mirror: `ppo_jax/evaluate.py`; the numbers are
computed in `ppo_rlhf.evaluation`."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ppo_rlhf import loop
from ppo_rlhf.evaluation import SampledScores
from ppo_rlhf.rewards import ScoreRequest, as_reward_model, check_scores
from ppo_rlhf.trainer_common import load_tokenizer
from ppo_torch.generate import generate
from ppo_torch.models import (ScalarHeadModel, load_pretrained, load_scalar_model, response_logprobs,
                              sequence_scores)


def _score(rm: Any, q, qm, r, rm_mask, prompts, texts) -> np.ndarray:
    if isinstance(rm, ScalarHeadModel):
        return sequence_scores(rm, q, qm, r, rm_mask).cpu().numpy()
    req = ScoreRequest(q.cpu().numpy(), qm.cpu().numpy(), r.cpu().numpy(), rm_mask.cpu().numpy(),
                       prompts=prompts, responses=texts)
    return check_scores(as_reward_model(rm).score(req), len(prompts), source="reward")


@torch.no_grad()
def sample_and_score(policy: str | os.PathLike, prompts: Sequence[str], *,
                     reference: str | os.PathLike | None = None, reward_model: Any = None,
                     max_prompt_len: int = 64, max_new_tokens: int = 32, temperature: float = 0.7,
                     batch_size: int = 16, seed: int = 0, dtype: str = "float32",
                     progress: bool = False) -> SampledScores:
    """Sample one response per prompt from `policy` (and from `reference`, for the win-rate),
    with log-probs under both models (at `temperature`) and reward-model scores."""
    tok = load_tokenizer(policy)
    pol = load_pretrained(policy, dtype)
    ref = load_pretrained(reference, dtype) if reference is not None else None
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = load_scalar_model(reward_model, dtype)
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[str, list] = {k: [] for k in ("responses", "lp", "ref_lp", "len", "eos", "rm",
                                            "ref_responses", "ref_rm")}
    n = len(prompts)
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="eval (torch)", unit="batch")
    for b, start in enumerate(batches):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # same batch shapes as the JAX twin
        q, qm, _ = loop.tokenize_prompts(tok, chunk, max_prompt_len)
        q, qm = torch.from_numpy(q).long(), torch.from_numpy(qm).long()
        seed_b = loop.sampling_seed(seed, b)
        models = [("", pol)] + ([("ref_", ref)] if ref is not None else [])
        for prefix, model in models:
            gen = torch.Generator().manual_seed(seed_b + len(prefix))
            g = generate(model, q, qm, max_new_tokens=max_new_tokens, temperature=temperature,
                         eos_token_id=eos, pad_token_id=pad, generator=gen)
            r, rmask = g.response_ids.long(), g.response_mask.long()
            texts = loop.decode_responses(tok, r.numpy(), rmask.numpy())
            scores = None if reward_model is None else _score(reward_model, q, qm, r, rmask, chunk, texts)
            if prefix:
                out["ref_responses"] += texts[:real]
                if scores is not None:
                    out["ref_rm"] += list(scores[:real])
                continue
            lp = response_logprobs(pol, q, qm, r, rmask, temperature=temperature)
            ref_lp = lp if ref is None else response_logprobs(ref, q, qm, r, rmask, temperature=temperature)
            mask = rmask.numpy()
            out["responses"] += texts[:real]
            out["lp"] += list(lp.sum(1).numpy()[:real])
            out["ref_lp"] += list(ref_lp.sum(1).numpy()[:real])
            out["len"] += list(mask.sum(1)[:real])
            out["eos"] += list(loop.contains_eos(r.numpy(), mask, eos)[:real])
            if scores is not None:
                out["rm"] += list(scores[:real])
    return SampledScores(
        prompts=list(prompts), responses=out["responses"],
        logprobs_sum=np.asarray(out["lp"], np.float64), ref_logprobs_sum=np.asarray(out["ref_lp"], np.float64),
        response_len=np.asarray(out["len"]), contains_eos=np.asarray(out["eos"], bool),
        rm_scores=np.asarray(out["rm"]) if reward_model is not None else None,
        ref_responses=out["ref_responses"] if ref is not None else None,
        ref_rm_scores=np.asarray(out["ref_rm"]) if ref is not None and reward_model is not None else None,
    )
