"""A task with a verifiable reward: two-operand addition, scored by exact match.

A prompt is "a+b=" with 0 <= a, b <= `MAX_OPERAND` (100 distinct prompts); the right response is
the decimal sum, "a+b" written without leading zeros ("3+4=" -> "7", "8+9=" -> "17"). The reward
is checked, not learned:

  gold_reward(prompt, response) = 1.0 if response.strip() == str(a + b) else 0.0

  * leading and trailing whitespace of the response is ignored ("  7 " scores 1);
  * anything else makes it wrong: another number, extra characters ("7+1", "77", "7 1"), a
    leading zero ("07"), an empty response;
  * EOS is not text: the rollout decodes a response up to its EOS with special tokens skipped, so
    "7" followed by EOS scores 1, and a response that never stops ("7777", cut at the length
    limit) scores 0. (PPO's `missing_eos_penalty` adds its own penalty to the latter.)

The score is in {0, 1}, so its mean over samples is the accuracy. `well_formed` (the evaluation's
share of well-formed responses) is "a decimal number without leading zeros", right or wrong.

Why a tiny model can learn it, and why RL has something to do: the pretraining corpus
(`generate_corpus`) covers every prompt, but only a share `1 - CORPUS_NOISE` of its answers are
right; the others are off by one or another number in range. A small GPT-2-style model pretrained
on it learns at most that noisy distribution (the right answer is each prompt's most frequent
one, never the only one), and after the demo's short pretraining less: sampled at temperature 1
it answers right well under half the time, often off by one.
Exact-match RL on the train prompts then moves probability mass onto the right answers; since the
noise is the same kind everywhere, the held-out eval prompts (disjoint from the train prompts)
improve too.

Data: `all_prompts` (100, fixed order), `train_prompts` / `eval_prompts` (a fixed 75 / 25 split),
`generate_corpus` (seeded; prompts uniform over all 100), `preference_data` (pairs of corpus-like
answers labelled by `SyntheticLabeller(gold_reward)`, for the RLHF path), `build_tokenizer` (one
token per character: the digits, "+", "="; whitespace is dropped; decoding joins the characters
with no spaces).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from ppo_rlhf.tasks.demo_model import DEMO_MODEL_SIZES, gpt2_config, save_tokenizer_dir

MAX_OPERAND = 9
"""Operands are 0..MAX_OPERAND; sums 0..2*MAX_OPERAND (one or two digits)."""
CORPUS_NOISE = 0.5
"""Share of corpus answers that are wrong (half off by one, half another number in range)."""
EVAL_FRACTION = 0.25
_SPLIT_SEED = 20240607  # fixes the train/eval split of the prompts for good
MAX_PROMPT_TOKENS = 4    # "9+9=": one token per character
MAX_RESPONSE_TOKENS = 4  # two digits and EOS, one token to spare
GOLD_RANGE = (0.0, 1.0)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
                  "unk_token": "<unk>"}
"""Special tokens of the task's tokenizer; their ids are 0, 1, 2, 3 in this order."""
SYMBOLS = tuple("0123456789+=")
"""The tokenizer's ordinary tokens (ids 4, 5, ... in this order)."""

_PROMPT_RE = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")


# ---- prompts -------------------------------------------------------------------------------

def all_prompts() -> list[str]:
    """Every distinct prompt "a+b=", a and b in 0..MAX_OPERAND, in a fixed order."""
    return [f"{a}+{b}=" for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def _split() -> tuple[list[str], list[str]]:
    prompts = all_prompts()
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(prompts))
    eval_idx = set(perm[:round(EVAL_FRACTION * len(prompts))].tolist())
    return ([p for i, p in enumerate(prompts) if i not in eval_idx],
            [p for i, p in enumerate(prompts) if i in eval_idx])


def train_prompts() -> list[str]:
    """The prompts for RL (75 of the 100; disjoint from `eval_prompts`; fixed, not seeded)."""
    return _split()[0]


def eval_prompts() -> list[str]:
    """Held-out prompts for evaluation (25 of the 100)."""
    return _split()[1]


def answer(prompt: str) -> str:
    """The right response to `prompt` ("3+4=" -> "7"). A prompt that is not "a+b=" is a
    ValueError."""
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt 'a+b=': {prompt!r}")
    return str(int(m.group(1)) + int(m.group(2)))


# ---- the verifiable reward -----------------------------------------------------------------

def gold_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Exact match: 1.0 where `response.strip() == answer(prompt)`, else 0.0 (module docstring)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [float(r.strip() == answer(p)) for p, r in zip(prompts, responses)]


def well_formed(prompt: str, response: str) -> bool:
    """Is the response a decimal number without leading zeros (right or wrong)?"""
    return re.fullmatch(r"0|[1-9]\d*", response.strip()) is not None


# ---- corpus --------------------------------------------------------------------------------

def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def generate_response(prompt: str, rng: np.random.Generator, *, noise: float = CORPUS_NOISE) -> str:
    """One corpus answer to `prompt`: right with probability 1 - noise; else wrong, by one
    (either way, kept >= 0) or another sum in 0..2*MAX_OPERAND, each half the time."""
    right = int(answer(prompt))
    if rng.random() >= noise:
        return str(right)
    if rng.random() < 0.5:
        wrong = right + (1 if right == 0 or rng.random() < 0.5 else -1)
    else:
        wrong = int(rng.integers(0, 2 * MAX_OPERAND))  # 0..2*MAX_OPERAND, skipping `right`
        wrong += wrong >= right
    return str(wrong)


def generate_corpus(n: int, *, seed: int | np.random.Generator = 0,
                    noise: float = CORPUS_NOISE) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs for pretraining: prompts uniform over all 100, answers from
    `generate_response` (a share `noise` of them wrong). Deterministic in `seed`; the first m
    pairs of a corpus of n > m are the corpus of m."""
    rng = _rng(seed)
    prompts = all_prompts()
    out = []
    for _ in range(n):
        p = prompts[rng.integers(len(prompts))]
        out.append((p, generate_response(p, rng, noise=noise)))
    return out


def corpus_texts(n: int, **kwargs: Any) -> list[str]:
    """`generate_corpus` as plain documents, "prompt answer" ("3+4= 7"; the tokenizer drops the
    space). Token ids of a training sequence: tokenizer(text) + [eos]."""
    return [f"{p} {r}" for p, r in generate_corpus(n, **kwargs)]


def preference_data(n: int, *, kind: str = "pairwise", k: int = 4, seed: int = 0,
                    temperature: float = 0.2, noise: float = CORPUS_NOISE, split: str = "train") -> Any:
    """Preferences for reward-model training, labelled by `SyntheticLabeller(gold_reward)`: for
    `n` prompts drawn from `split` ("train", "eval", "all"), two (kind="pairwise") or `k`
    (kind="ranking") independent corpus-like answers, labelled with Bradley-Terry /
    Plackett-Luce noise at `temperature` (gold is 0 or 1: two right or two wrong answers are a
    coin flip). Returns the labeller's `LabelledPairs` or `LabelledRankings`."""
    from ppo_rlhf.feedback.labeller import SyntheticLabeller

    pool = {"train": train_prompts, "eval": eval_prompts, "all": all_prompts}.get(split)
    if pool is None:
        raise ValueError(f"split={split!r} is invalid: allowed 'train', 'eval', 'all'")
    rng = np.random.default_rng(seed)
    prompts = [pool()[i] for i in rng.integers(0, len(pool()), size=n)]
    labeller = SyntheticLabeller(gold_reward, temperature=temperature, seed=rng)
    if kind == "pairwise":
        a = [generate_response(p, rng, noise=noise) for p in prompts]
        b = [generate_response(p, rng, noise=noise) for p in prompts]
        return labeller.label_pairs(prompts, a, b)
    if kind == "ranking":
        rs = [[generate_response(p, rng, noise=noise) for _ in range(k)] for p in prompts]
        return labeller.label_rankings(prompts, rs)
    raise ValueError(f"kind={kind!r} is invalid: allowed 'pairwise', 'ranking'")


# ---- tokenizer and model -------------------------------------------------------------------

def build_tokenizer(out_dir: str | os.PathLike[str] | None = None) -> Any:
    """The task's character-level tokenizer (a `tokenizers.Tokenizer`, fixed vocabulary, nothing
    trained): specials <pad> <bos> <eos> <unk> (ids 0-3), then "0".."9", "+", "=". Whitespace
    separates nothing and is dropped ("3+4= 7" and "3+4=7" are the same ids); any other
    character is <unk>. Decoding joins the characters without spaces. With `out_dir`, also save
    it as a Hugging Face tokenizer directory that `AutoTokenizer.from_pretrained` loads offline."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ImportError("build_tokenizer needs the `tokenizers` library: "
                          "pip install tokenizers") from None
    specials = list(SPECIAL_TOKENS.values())
    vocab = {t: i for i, t in enumerate(specials + list(SYMBOLS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex("."), behavior="isolated"),
    ])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    if out_dir is not None:
        save_tokenizer_dir(tok, out_dir, SPECIAL_TOKENS, MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS + 2)
    return tok




def demo_model_config(size: str = "small", *, vocab_size: int | None = None) -> dict[str, Any]:
    """The demo policy's architecture: a GPT-2-style Hugging Face config as a dict (as the
    reviews task's, `ppo_rlhf.tasks.reviews.demo_model_config`), with this task's vocabulary
    (16 tokens) and n_positions = 16 (a prompt and a response take at most 8)."""
    if vocab_size is None:
        vocab_size = len(SPECIAL_TOKENS) + len(SYMBOLS)
    return gpt2_config(size, vocab_size=vocab_size, n_positions=16)


def _task() -> Any:
    from ppo_rlhf.tasks import Task

    return Task(
        name="arithmetic",
        description="two-operand addition 'a+b=' (0..9); gold reward = exact match of the sum, 0 or 1",
        gold_reward=gold_reward,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        generate_corpus=generate_corpus,
        preference_data=preference_data,
        build_tokenizer=build_tokenizer,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_response_tokens=MAX_RESPONSE_TOKENS,
        gold_range=GOLD_RANGE,
        demo_model_config=demo_model_config,
        well_formed=well_formed,
        verifiable=True,
    )


TASK = _task()

__all__ = ["MAX_OPERAND", "CORPUS_NOISE", "EVAL_FRACTION", "MAX_PROMPT_TOKENS", "MAX_RESPONSE_TOKENS",
           "GOLD_RANGE", "SPECIAL_TOKENS", "SYMBOLS", "all_prompts", "train_prompts", "eval_prompts",
           "answer", "gold_reward", "well_formed", "generate_response", "generate_corpus",
           "corpus_texts", "preference_data", "build_tokenizer", "DEMO_MODEL_SIZES",
           "demo_model_config", "TASK"]
