"""The reviews task's word-level tokenizer and the demo policy's architecture."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS,
                  "model_max_length": MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS + 2,
                  "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    return tok


# ---- the demo model ------------------------------------------------------------------------

DEMO_MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 2},     # ~30k parameters: tests
    "small": {"n_embd": 128, "n_layer": 4, "n_head": 4},   # ~0.8M parameters: the demo
}


def demo_model_config(size: str = "small", *, vocab_size: int | None = None) -> dict[str, Any]:
    """The demo policy's architecture: a Hugging Face GPT2Config as a dict (config.json
    contents), GPT-2 style (learned positions, tied embeddings, gelu_new, no dropout), with the
    task tokenizer's vocabulary (`vocab_size` default: `build_tokenizer()`'s, about 120) and
    special tokens. `size`: "small" (~0.8M parameters, fluent after ~2 minutes of CPU
    pretraining) or "tiny" (~30k, for tests). n_positions = 64 covers a prompt and a response
    (MAX_PROMPT_TOKENS + MAX_RESPONSE_TOKENS = 30) with room to spare."""
    if size not in DEMO_MODEL_SIZES:
        raise ValueError(f"size={size!r} is invalid: allowed {', '.join(map(repr, DEMO_MODEL_SIZES))}")
    if vocab_size is None:
        vocab_size = build_tokenizer().get_vocab_size()
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": int(vocab_size),
            "n_positions": 64, **DEMO_MODEL_SIZES[size], "n_inner": None,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "summary_first_dropout": 0.0, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
            "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
