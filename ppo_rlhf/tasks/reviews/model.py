"""The reviews task's word-level tokenizer and the demo policy's architecture."""

from __future__ import annotations

import os
import re
from typing import Any

from ppo_rlhf.tasks.demo_model import gpt2_config, save_tokenizer_dir
from ppo_rlhf.tasks.reviews.corpus import corpus_texts
from ppo_rlhf.tasks.reviews.grammar import (
    CATEGORIES,
    MAX_PROMPT_TOKENS,
    MAX_RESPONSE_TOKENS,
    OFF_TOPIC_TEMPLATES,
    PROMPT_TEMPLATES,
    SENTENCE_TEMPLATES,
    tokenize,
)

# ---- tokenizer -----------------------------------------------------------------------------

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>",
                  "unk_token": "<unk>"}
"""Special tokens of the task's tokenizer; their ids are 0, 1, 2, 3 in this order."""


def vocabulary() -> list[str]:
    """Every word the task's text can hold (grammar, prompts, noise), sorted."""
    texts = list(SENTENCE_TEMPLATES) + list(OFF_TOPIC_TEMPLATES) + list(PROMPT_TEMPLATES)
    words = {w for t in texts for w in tokenize(re.sub(r"\{\w+\??\}", " ", t))}
    words |= {w for ws in CATEGORIES.values() for x in ws for w in tokenize(x)}
    return sorted(words)


def build_tokenizer(out_dir: str | os.PathLike[str] | None = None, *, corpus_size: int = 2000,
                    seed: int = 0) -> Any:
    """Train the task's word-level tokenizer offline with `tokenizers` and return it (a
    `tokenizers.Tokenizer`); with `out_dir`, also save it as a Hugging Face tokenizer directory
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads offline as a
    `PreTrainedTokenizerFast`.

    Tokens: each word with its leading space marker ("▁good") and each punctuation mark alone;
    input is lower-cased; unknown words map to <unk>. The special tokens <pad> <bos> <eos> <unk>
    have ids 0-3 and are never added automatically: a training sequence is
    `ids(prompt + " " + response) + [eos]` and decoding restores the spacing
    ("▁the ▁phone ▁is ▁good ." -> "the phone is good."). The vocabulary (about 120 tokens) is
    the corpus's words in order of frequency, plus every word of `vocabulary()`."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("build_tokenizer needs the `tokenizers` library: "
                          "pip install tokenizers") from None
    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.WordLevelTrainer(vocab_size=512, min_frequency=1, special_tokens=specials,
                                        show_progress=False)
    texts = corpus_texts(corpus_size, seed=seed) + [" ".join(vocabulary())]
    tok.train_from_iterator(texts, trainer=trainer)
    if [tok.token_to_id(s) for s in specials] != [0, 1, 2, 3]:
        raise RuntimeError("special tokens did not get ids 0-3")
    if out_dir is not None:
        save_tokenizer_dir(tok, out_dir, SPECIAL_TOKENS, MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS + 2)
    return tok


# ---- the demo model ------------------------------------------------------------------------



def demo_model_config(size: str = "small", *, vocab_size: int | None = None) -> dict[str, Any]:
    """The demo policy's architecture: a Hugging Face GPT2Config as a dict (config.json
    contents), GPT-2 style (learned positions, tied embeddings, gelu_new, no dropout), with the
    task tokenizer's vocabulary (`vocab_size` default: `build_tokenizer()`'s, about 120) and
    special tokens. `size`: "small" (~0.8M parameters, fluent after ~2 minutes of CPU
    pretraining) or "tiny" (~30k, for tests). n_positions = 64 covers a prompt and a response
    (MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS = 30) with room to spare."""
    if vocab_size is None:
        vocab_size = build_tokenizer().get_vocab_size()
    return gpt2_config(size, vocab_size=vocab_size, n_positions=64)
