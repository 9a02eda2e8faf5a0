"""What the built-in tasks share for their demo model: a `tokenizers` tokenizer saved as a
Hugging Face tokenizer dir, and a small GPT-2-style config.json to pretrain from scratch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEMO_MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 2},     # ~30k parameters: tests
    "small": {"n_embd": 128, "n_layer": 4, "n_head": 4},   # ~0.8M parameters: the demos
}


def save_tokenizer_dir(tok: Any, out_dir: str | os.PathLike, special_tokens: dict[str, str],
                       model_max_length: int) -> None:
    """`tok` (a `tokenizers.Tokenizer`) as a dir `transformers` loads with AutoTokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens,
              "model_max_length": model_max_length, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")


def gpt2_config(size: str, *, vocab_size: int, n_positions: int) -> dict[str, Any]:
    """A Hugging Face GPT2Config as a dict (config.json contents): learned positions, tied
    embeddings, gelu_new, no dropout, special ids pad 0 / bos 1 / eos 2; `size` one of
    `DEMO_MODEL_SIZES`."""
    if size not in DEMO_MODEL_SIZES:
        raise ValueError(f"size={size!r} is invalid: allowed {', '.join(map(repr, DEMO_MODEL_SIZES))}")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": int(vocab_size),
            "n_positions": n_positions, **DEMO_MODEL_SIZES[size], "n_inner": None,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "summary_first_dropout": 0.0, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
            "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
