"""The reviews task's text: prompts (a fixed train/eval split), responses from the grammar with
noise, the pretraining corpus, and synthetic-labeller preference data."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ppo_rlhf.tasks.reviews.grammar import (
    _END_MARKS,
    CATEGORIES,
    ITEMS,
    MAX_RESPONSE_TOKENS,
    OFF_TOPIC_TEMPLATES,
    PROMPT_TEMPLATES,
    SENTENCE_TEMPLATES,
    _polarity,
    gold_reward,
    prompt_item,
)

DEFAULT_MIX = (0.60, 0.25, 0.15)
"""Shares of positive, negative and neutral reviews in the corpus: with the noise and the
mixed-sentiment sentences, about 46% of corpus responses score above 0 (mean gold about 0.05)."""

EVAL_FRACTION = 0.25
_SPLIT_SEED = 20240531  # fixes the train/eval split of the prompts for good


# ---- prompts -------------------------------------------------------------------------------

def all_prompts() -> list[str]:
    """Every distinct prompt (templates x items), in a fixed order."""
    return [t.format(item=item) for t in PROMPT_TEMPLATES for item in ITEMS]


def _split() -> tuple[list[str], list[str]]:
    prompts = all_prompts()
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(prompts))
    n_eval = round(EVAL_FRACTION * len(prompts))
    eval_idx = set(perm[:n_eval].tolist())
    return ([p for i, p in enumerate(prompts) if i not in eval_idx],
            [p for i, p in enumerate(prompts) if i in eval_idx])


def train_prompts() -> list[str]:
    """The prompts for PPO (72 of the 96; disjoint from `eval_prompts`; fixed, not seeded)."""
    return _split()[0]


def eval_prompts() -> list[str]:
    """Held-out prompts for evaluation (24 of the 96)."""
    return _split()[1]


def sample_prompts(n: int, *, seed: int | np.random.Generator = 0,
                   split: str = "train") -> list[str]:
    """`n` prompts drawn uniformly with replacement from the split ("train", "eval" or "all")."""
    pool = {"train": train_prompts, "eval": eval_prompts, "all": all_prompts}.get(split)
    if pool is None:
        raise ValueError(f"split={split!r} is invalid: allowed 'train', 'eval', 'all'")
    prompts = pool()
    rng = _rng(seed)
    return [prompts[i] for i in rng.integers(0, len(prompts), size=n)]


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---- responses -----------------------------------------------------------------------------

def _fill(template: str, rng: np.random.Generator, item: str) -> list[str]:
    """A random sentence of `template` (tokens), with the prompt's item in the {item} slots."""
    out: list[str] = []
    for piece in template.split(" "):
        m = re.fullmatch(r"\{(\w+)(\??)\}", piece)
        if m is None:
            out.append(piece)
            continue
        name, optional = m.group(1), bool(m.group(2))
        if optional and rng.random() < 0.7:
            continue
        if name == "item":
            out.append(item)
        else:
            words = CATEGORIES[name]
            out.extend(words[rng.integers(len(words))].split(" "))
    return out


def _sentence(rng: np.random.Generator, item: str, sign: int) -> list[str]:
    """A grammatical sentence about `item` whose sentiment has the sign `sign` (-1, 0, +1),
    by rejection sampling over the templates and their slots."""
    for _ in range(200):
        sent = _fill(SENTENCE_TEMPLATES[rng.integers(len(SENTENCE_TEMPLATES))], rng, item)
        pol = _polarity(sent, set())
        if (pol > 0) - (pol < 0) == sign:
            return sent
    raise RuntimeError("no sentence of the requested sentiment")  # unreachable in practice


def _detokenize(tokens: list[str]) -> str:
    """Join tokens with spaces, attaching punctuation to the word before it."""
    text = ""
    for t in tokens:
        text += t if (not text or not t[0].isalpha()) else " " + t
    return text


_NOISE_KINDS = ("truncate", "repeat_word", "drop_word", "swap_words", "wrong_item", "off_topic")


def _corrupt(tokens: list[str], rng: np.random.Generator, item: str) -> list[str]:
    """One random corruption: the kinds of ill-formed text the gold reward penalises."""
    kind = _NOISE_KINDS[rng.integers(len(_NOISE_KINDS))]
    t = list(tokens)
    words = [i for i, w in enumerate(t) if w[0].isalpha()]
    i = words[rng.integers(len(words))]
    if kind == "truncate":  # cut the response mid-sentence (no final period)
        t = t[:max(1, len(t) - 1 - int(rng.integers(0, 3)))]
        while t and t[-1] in _END_MARKS:
            t.pop()
    elif kind == "repeat_word":
        t.insert(i, t[i])
    elif kind == "drop_word":
        del t[i]
    elif kind == "swap_words" and i + 1 < len(t):
        t[i], t[i + 1] = t[i + 1], t[i]
    elif kind == "wrong_item":
        others = [x for x in ITEMS if x != item]
        t = [others[rng.integers(len(others))] if w == item else w for w in t]
        if item not in tokens:  # no item to replace: mention a wrong one
            t += ["i", "bought", "the", others[rng.integers(len(others))], "."]
    else:  # off_topic
        template = OFF_TOPIC_TEMPLATES[rng.integers(len(OFF_TOPIC_TEMPLATES))]
        t += _fill(template, rng, item)
    return t


def generate_response(prompt: str, rng: np.random.Generator, *,
                      mix: tuple[float, float, float] = DEFAULT_MIX,
                      noise: float = 0.15) -> str:
    """One corpus-like review for `prompt`. Its overall sentiment is positive / negative /
    neutral with probabilities `mix`; it has 1-3 distinct sentences, each of the review's sentiment with
    probability 0.75 (else neutral 0.15, opposite 0.10; a neutral review: neutral 0.7, each
    polarity 0.15). With probability `noise` one corruption is applied (truncation, a repeated /
    dropped / swapped word, the wrong item, an off-topic sentence)."""
    item = prompt_item(prompt) or ITEMS[rng.integers(len(ITEMS))]
    cls = (1, -1, 0)[rng.choice(3, p=np.asarray(mix, dtype=np.float64) / sum(mix))]
    budget = MAX_RESPONSE_TOKENS - 4  # room for EOS and for a corruption that adds a word
    while True:
        n = 1 + int(rng.choice(3, p=(0.3, 0.45, 0.25)))
        sentences: list[list[str]] = []
        for _ in range(n):
            u = rng.random()
            if cls == 0:
                sign = 0 if u < 0.7 else (1 if u < 0.85 else -1)
            else:
                sign = cls if u < 0.75 else (0 if u < 0.9 else -cls)
            sentences.append(_sentence(rng, item, sign))
        tokens = [t for sent in sentences for t in sent]
        distinct = len({tuple(x) for x in sentences}) == len(sentences)
        if distinct and len(tokens) <= budget - 6:  # an off-topic sentence may add 6 tokens
            break
    if rng.random() < noise:
        tokens = _corrupt(tokens, rng, item)
    return _detokenize(tokens)


def generate_corpus(n: int, *, seed: int | np.random.Generator = 0,
                    mix: tuple[float, float, float] = DEFAULT_MIX,
                    noise: float = 0.15) -> list[tuple[str, str]]:
    """`n` (prompt, response) pairs for pretraining: prompts uniform over all 96 prompts,
    responses from `generate_response`. Deterministic in `seed`; the first m pairs of a corpus
    of n > m are the corpus of m."""
    rng = _rng(seed)
    prompts = all_prompts()
    out = []
    for _ in range(n):  # one prompt, then its response: a longer corpus extends a shorter one
        p = prompts[rng.integers(len(prompts))]
        out.append((p, generate_response(p, rng, mix=mix, noise=noise)))
    return out


def corpus_texts(n: int, **kwargs: Any) -> list[str]:
    """`generate_corpus` as plain documents, "prompt response" (a space between them). Token ids
    of a training sequence: tokenizer(text) + [eos]."""
    return [f"{p} {r}" for p, r in generate_corpus(n, **kwargs)]


# ---- preference data -----------------------------------------------------------------------

def preference_data(n: int, *, kind: str = "pairwise", k: int = 4, seed: int = 0,
                    temperature: float = 0.2, noise: float = 0.15, split: str = "train",
                    mix: tuple[float, float, float] = DEFAULT_MIX) -> Any:
    """Preferences for reward-model training, labelled by `SyntheticLabeller(gold_reward)`:
    for `n` prompts of `split`, two (kind="pairwise") or `k` (kind="ranking") independent
    corpus-like responses, labelled with Bradley-Terry / Plackett-Luce noise at `temperature`
    (gold is in [-1, 1], so 0.2 makes a 0.2 gold gap a 73:27 call). Returns the labeller's
    `LabelledPairs` or `LabelledRankings` (records, gold scores, noise ceiling)."""
    from ppo_rlhf.feedback.labeller import SyntheticLabeller

    rng = np.random.default_rng(seed)
    prompts = sample_prompts(n, seed=rng, split=split)
    labeller = SyntheticLabeller(gold_reward, temperature=temperature, seed=rng)
    if kind == "pairwise":
        a = [generate_response(p, rng, mix=mix, noise=noise) for p in prompts]
        b = [generate_response(p, rng, mix=mix, noise=noise) for p in prompts]
        return labeller.label_pairs(prompts, a, b)
    if kind == "ranking":
        rs = [[generate_response(p, rng, mix=mix, noise=noise) for _ in range(k)] for p in prompts]
        return labeller.label_rankings(prompts, rs)
    raise ValueError(f"kind={kind!r} is invalid: allowed 'pairwise', 'ranking'")
