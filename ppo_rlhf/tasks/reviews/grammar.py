"""The reviews task's grammar and its gold reward (see the package docstring for the rule)."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

# ---- the grammar ---------------------------------------------------------------------------

ITEMS = ("phone", "laptop", "camera", "blender", "kettle", "lamp", "chair", "backpack",
         "speaker", "watch", "printer", "jacket", "tent", "bike", "mug", "toaster")
ASPECTS = ("price", "design", "quality", "size", "color", "material", "packaging", "finish",
           "weight", "sound")
POSITIVE_ADJ = ("great", "good", "excellent", "amazing", "perfect", "lovely", "solid", "wonderful")
NEGATIVE_ADJ = ("bad", "terrible", "awful", "poor", "flimsy", "useless", "disappointing",
                "horrible")
NEUTRAL_ADJ = ("okay", "fine", "average", "ordinary", "standard", "acceptable")
INTENSIFIERS = ("very", "really", "quite", "extremely")
POSITIVE_VERB = ("love", "like", "enjoy")
NEGATIVE_VERB = ("hate", "dislike")
POSITIVE_ADV = ("well", "perfectly", "nicely")
NEGATIVE_ADV = ("poorly", "badly")
NEUTRAL_ADV = ("normally", "as expected")
NEGATIONS = ("not",)

LEXICON: dict[str, float] = {
    **{w: 1.0 for w in POSITIVE_ADJ + POSITIVE_VERB + POSITIVE_ADV + ("recommend",)},
    **{w: -1.0 for w in NEGATIVE_ADJ + NEGATIVE_VERB + NEGATIVE_ADV},
}
"""Polarity of each sentiment word (words not listed count 0)."""
INTENSIFIER_GAIN = 1.5
NEGATION_GAIN = -0.5

CATEGORIES: dict[str, tuple[str, ...]] = {
    "item": ITEMS,
    "aspect": ASPECTS,
    "adj": POSITIVE_ADJ + NEGATIVE_ADJ + NEUTRAL_ADJ,
    "polar_adj": POSITIVE_ADJ + NEGATIVE_ADJ,
    "intens": INTENSIFIERS,
    "verb": POSITIVE_VERB + NEGATIVE_VERB,
    "adv": POSITIVE_ADV + NEGATIVE_ADV + NEUTRAL_ADV,
    "time": ("today", "yesterday", "last week", "last month", "on monday"),
    "period": ("day", "week", "morning", "evening"),
    "container": ("box", "bag", "small box", "big box"),
    "person": ("a friend", "my family", "everyone"),
}

SENTENCE_TEMPLATES: tuple[str, ...] = (
    # Tokens separated by spaces (punctuation is a token); {cat} is a slot, {cat?} an optional one.
    "the {item} is {intens?} {adj} .",
    "the {aspect} is {intens?} {adj} .",
    "the {aspect} is not {polar_adj} .",
    "the {aspect} and the {aspect} are {intens?} {adj} .",
    "i {verb} this {item} .",
    "i {intens?} {verb} it .",
    "it works {adv} .",
    "i would recommend it .",
    "i would recommend it to {person} .",
    "i would not recommend it .",
    "overall , it is {intens?} {adj} .",
    "overall , the {item} is {intens?} {adj} .",
    "i bought the {item} {time} .",
    "i use it every {period} .",
    "it came in a {container} .",
    "it arrived {time} .",
)
"""The review grammar: a sentence is well formed iff it matches one of these."""

OFF_TOPIC_TEMPLATES: tuple[str, ...] = (
    # Used only as corpus noise: grammatical English, but not a sentence of the review grammar.
    "the weather is {adj} today .",
    "my dog is {intens?} {adj} .",
    "the traffic was {adj} .",
    "dinner was {intens?} {adj} .",
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "review of the {item}:",
    "my review of the {item}:",
    "thoughts on the {item}:",
    "about the {item}:",
    "rating the {item}:",
    "i bought the {item}.",
)

MAX_PROMPT_TOKENS = 6
"""Longest prompt, in tokens of `build_tokenizer`'s tokenizer ("my review of the phone :")."""
MAX_RESPONSE_TOKENS = 24
"""The response length the task is designed for, in tokens, EOS included; corpus responses are
at most MAX_RESPONSE_TOKENS - 4 tokens, and the gold reward penalises longer text."""
GOLD_RANGE = (-1.0, 1.0)
"""Bounds of `gold_reward` (for mapping it onto a rating scale)."""


def _compile(template: str) -> re.Pattern[str]:
    pattern = ""
    for piece in template.split(" "):
        m = re.fullmatch(r"\{(\w+)(\??)\}", piece)
        if m is None:
            pattern += re.escape(piece) + " "
            continue
        alts = "|".join(re.escape(w) for w in sorted(CATEGORIES[m.group(1)], key=len, reverse=True))
        pattern += f"(?:(?:{alts}) )?" if m.group(2) else f"(?:{alts}) "
    return re.compile(pattern[:-1])


_SENTENCE_RES = tuple(_compile(t) for t in SENTENCE_TEMPLATES)
_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")
_END_MARKS = (".", "!")
_ITEM_SET = frozenset(ITEMS)


def tokenize(text: str) -> list[str]:
    """Lower-cased tokens: runs of letters a-z, and every other non-space character alone."""
    return _TOKEN_RE.findall(text.lower())


def _split_sentences(tokens: list[str]) -> tuple[list[list[str]], list[str]]:
    """(finished sentences, unfinished trailing tokens)."""
    sentences, cur = [], []
    for t in tokens:
        cur.append(t)
        if t in _END_MARKS:
            sentences.append(cur)
            cur = []
    return sentences, cur


def _is_grammatical(sentence: list[str]) -> bool:
    s = " ".join(sentence)
    return any(r.fullmatch(s) for r in _SENTENCE_RES)


def prompt_item(prompt: str) -> str | None:
    """The item a prompt is about: its one item word, or None if it names none or several."""
    items = {t for t in tokenize(prompt) if t in _ITEM_SET}
    return items.pop() if len(items) == 1 else None


def _polarity(sentence: list[str], used: set[str]) -> float:
    total, negated = 0.0, False
    for i, t in enumerate(sentence):
        if t in NEGATIONS:
            negated = True
        pol = LEXICON.get(t)
        if pol is None or t in used:
            continue
        used.add(t)
        if i > 0 and sentence[i - 1] in INTENSIFIERS:
            pol *= INTENSIFIER_GAIN
        if negated:
            pol *= NEGATION_GAIN
        total += pol
    return total


def gold_details(prompt: str, response: str) -> dict[str, Any]:
    """The parts of the gold reward of one response: sentences, well_formed (per sentence),
    unfinished (tokens), f, S, s and gold. See the module docstring."""
    tokens = tokenize(response)
    sentences, unfinished = _split_sentences(tokens)
    item = prompt_item(prompt)
    seen: set[tuple[str, ...]] = set()
    well: list[bool] = []
    for sent in sentences:
        ok = _is_grammatical(sent) and tuple(sent) not in seen
        if ok and item is not None:
            ok = all(t == item for t in sent if t in _ITEM_SET)
        seen.add(tuple(sent))
        well.append(ok)
    units = len(sentences) + (1 if unfinished else 0)
    f = sum(well) / units if units else 0.0
    if len(tokens) > MAX_RESPONSE_TOKENS:
        f *= MAX_RESPONSE_TOKENS / len(tokens)
    used: set[str] = set()
    S = sum(_polarity(sent, used) for sent, ok in zip(sentences, well) if ok)
    s = math.tanh(S / 2.0)
    return {"sentences": [" ".join(x) for x in sentences], "well_formed": well,
            "unfinished": unfinished, "f": f, "S": S, "s": s, "gold": f * s - (1.0 - f)}


def gold_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """The demo task's gold reward, one float in [-1, 1) per (prompt, response): positive
    sentiment of the well-formed sentences, dragged towards -1 by ill-formed text. A
    `ppo_rlhf.rewards.RewardFn`; see the module docstring for the definition."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_details(p, r)["gold"] for p, r in zip(prompts, responses)]
