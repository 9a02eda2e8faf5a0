"""Helpers for tests, benchmarks and the demo: tiny random Hugging Face checkpoints and tokenizers
built offline, and left-padded token batches.

Nothing here downloads anything. `make_tiny_checkpoint` imports torch and transformers (inside
the function: this module has no module-level jax/torch import), builds a small random model of
one of the supported architectures, saves it as safetensors (optionally sharded) with a tokenizer
trained on a built-in text, so that both `transformers.AutoModelForCausalLM.from_pretrained(dir)`
and `ppo_jax.models.load_pretrained(dir)` load it offline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from ppo_rlhf.hf_checkpoint import PPO_RLHF_KEY, SUPPORTED_MODEL_TYPES, check_model_type

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
"""Special tokens of the tiny tokenizer (trained with them first, so their ids are fixed). The
byte-level BPE never emits <unk>; it exists because some `transformers` tokenizer classes (e.g.
Qwen2Tokenizer, which AutoTokenizer picks for a qwen2 checkpoint) would otherwise ADD their own
default unk token past the model's vocabulary."""
NUM_SPECIAL = 4

TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A good answer is short, kind and true.
Once upon a time there was a little robot who liked to count: one, two, three, four, five.
Reinforcement learning from human feedback fine-tunes a language model with a learned reward.
The policy samples a response, the reward model scores it, and PPO nudges the policy upward.
Please write a happy sentence about the sun. The sun is bright and warm and makes me smile!
Please write a sad sentence about the rain. The rain is grey and cold and the day is long.
What is 2 + 3? The answer is 5. What is 7 - 4? The answer is 3. What is 6 * 7? It is 42.
Cats sleep all day, dogs bark at night, birds sing in the morning and fish swim in the sea.
She said "hello" to everyone; they said 'goodbye' -- and then (quietly) left the room.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024. Letters: a b c d e f g h i j k l m n o p.
I love this movie, it is wonderful and great. I hate this movie, it is awful and terrible.
The model should be helpful, honest and harmless, and it should never be rude to the user.
"""


# ---- tokenizer ---------------------------------------------------------------------------------
def make_tiny_tokenizer(path: str | os.PathLike | None = None, *, vocab_size: int = 512,
                        texts: Iterable[str] | None = None) -> Any:
    """Train a byte-level BPE tokenizer offline (on `texts`, default `TINY_CORPUS`) with at most
    `vocab_size` tokens: <pad>=0, <s>=1, </s>=2, <unk>=3, then the 256 byte symbols (any text
    encodes; <unk> is never produced), then merges. Returns a `transformers` fast tokenizer with
    padding on the LEFT (prompts are left-padded); saved to `path` when given, so that
    `AutoTokenizer.from_pretrained(path)` works offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < NUM_SPECIAL + 256:
        raise ValueError(f"make_tiny_tokenizer: vocab_size={vocab_size} is too small: a byte-level "
                         f"BPE needs {NUM_SPECIAL} special tokens + 256 byte symbols = "
                         f"{NUM_SPECIAL + 256} at least")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = TINY_CORPUS.splitlines() if texts is None else list(texts)
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, padding_side="left")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


# ---- checkpoints -------------------------------------------------------------------------------
def tiny_hf_config(arch: str, *, vocab_size: int = 512, tie_word_embeddings: bool | None = None,
                   **overrides: Any) -> Any:
    """A small `transformers` config of `arch` (2 layers, hidden 64, 4 heads of 16, no dropout):
    llama and qwen2 with grouped-query attention (2 KV heads; qwen2 has its q/k/v biases),
    gpt_neox with Pythia's parallel residual and partial rotary (25% of each head).
    `tie_word_embeddings=None` keeps each family's usual choice (gpt2, qwen2 tied; llama,
    gpt_neox untied). `overrides` go to the config constructor last."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    check_model_type(arch, "make_tiny_checkpoint(arch=...)")
    special = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, activation_function="gelu_new",
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                  tie_word_embeddings=True)
        cls = GPT2Config
    elif arch in ("llama", "qwen2"):
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                  tie_word_embeddings=(arch == "qwen2"))
        cls = LlamaConfig if arch == "llama" else Qwen2Config
    else:
        kw = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, hidden_act="gelu", use_parallel_residual=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.25},
                  hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0,
                  tie_word_embeddings=False)
        cls = GPTNeoXConfig
    kw.update(special, vocab_size=vocab_size, initializer_range=0.1)
    if tie_word_embeddings is not None:
        kw["tie_word_embeddings"] = tie_word_embeddings
    kw.update(overrides)
    return cls(**kw)


def make_tiny_checkpoint(path: str | os.PathLike, arch: str, *, vocab_size: int = 512, seed: int = 0,
                         tie_word_embeddings: bool | None = None,
                         dtype: Literal["float32", "bfloat16"] = "float32", shard: bool = False,
                         with_tokenizer: bool = True, kind: Literal["causal_lm", "scalar"] = "causal_lm",
                         reward_gain: float | None = None, reward_bias: float | None = None,
                         **config_overrides: Any) -> Path:
    """Build a tiny random `arch` model with `transformers` (see `tiny_hf_config`) and save it to
    `path`; returns the path.

    kind="causal_lm": `*ForCausalLM` / `GPT2LMHeadModel`; kind="scalar": the value / reward model
    format, `*ForSequenceClassification` with num_labels=1 (+ reward_gain / reward_bias in
    config.json under "ppo_rlhf" when given).

    Weights are drawn from `seed` and then perturbed so that every parameter matters to a parity
    test: HF's init (std 0.1 here) leaves norm weights at 1 and biases at 0, where a loader that
    mixed them up would go unnoticed; we add N(0, 0.1) noise to every 1-D parameter. The tokenizer
    (`make_tiny_tokenizer`, at most `vocab_size` tokens) is saved alongside unless
    `with_tokenizer=False`. `shard=True` saves several (3-4) safetensors shards +
    model.safetensors.index.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_type(arch, "make_tiny_checkpoint(arch=...)")
    if kind not in ("causal_lm", "scalar"):
        raise ValueError(f"make_tiny_checkpoint: kind={kind!r} is invalid: allowed 'causal_lm', 'scalar'")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"make_tiny_checkpoint: dtype={dtype!r} is invalid: allowed 'float32', 'bfloat16'")
    path = Path(path)
    config = tiny_hf_config(arch, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                            **config_overrides)
    if kind == "scalar":
        config.num_labels = 1
        if reward_gain is not None or reward_bias is not None:
            setattr(config, PPO_RLHF_KEY,
                    {"reward_gain": 1.0 if reward_gain is None else float(reward_gain),
                     "reward_bias": 0.0 if reward_bias is None else float(reward_bias)})
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if kind == "scalar" else AutoModelForCausalLM
    model = auto.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model = model.to(getattr(torch, dtype)).eval()
    max_shard = None
    if shard:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard = max(total // 3, 1)
    path.mkdir(parents=True, exist_ok=True)
    if max_shard is None:
        model.save_pretrained(str(path))
    else:
        model.save_pretrained(str(path), max_shard_size=max_shard)
    if with_tokenizer:
        make_tiny_tokenizer(path, vocab_size=vocab_size)
    return path


# ---- batches -----------------------------------------------------------------------------------
def make_padded_batch(seed: int, batch_size: int, prompt_len: int, response_len: int,
                      vocab_size: int, *, pad_id: int = PAD_ID, min_token: int = NUM_SPECIAL,
                      min_prompt_len: int = 1, min_response_len: int = 1
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random (query_ids, query_mask, response_ids, response_mask), int32, in the RolloutBatch
    layout: prompts LEFT-padded to `prompt_len` with lengths drawn in [min_prompt_len,
    prompt_len] (row 0 always full length, row 1 -- if any -- always the shortest, so batches
    mix lengths), responses RIGHT-padded to `response_len` with lengths in [min_response_len,
    response_len]. Real tokens are drawn from [min_token, vocab_size) (special ids stay out);
    padded positions hold `pad_id`."""
    rng = np.random.default_rng(seed)
    q_len = rng.integers(min_prompt_len, prompt_len + 1, size=batch_size)
    r_len = rng.integers(min_response_len, response_len + 1, size=batch_size)
    q_len[0], r_len[0] = prompt_len, response_len
    if batch_size > 1:
        q_len[1], r_len[1] = min_prompt_len, min_response_len
    query_mask = (np.arange(prompt_len)[None, :] >= prompt_len - q_len[:, None]).astype(np.int32)
    response_mask = (np.arange(response_len)[None, :] < r_len[:, None]).astype(np.int32)
    query_ids = rng.integers(min_token, vocab_size, size=(batch_size, prompt_len)).astype(np.int32)
    response_ids = rng.integers(min_token, vocab_size, size=(batch_size, response_len)).astype(np.int32)
    query_ids = np.where(query_mask == 1, query_ids, pad_id).astype(np.int32)
    response_ids = np.where(response_mask == 1, response_ids, pad_id).astype(np.int32)
    return query_ids, query_mask, response_ids, response_mask


@contextlib.contextmanager
def count_jax_compilations() -> Iterator[list[str]]:
    """A list that grows by one per XLA compilation while the block runs (every jit and every
    eager-op compilation goes through the backend compiler). With a persistent compilation cache
    on (the test suite turns one on) a program read back from it counts too: JAX records this
    event around `compile_or_get_cached`, cache read included (tested). Imports jax lazily."""
    import jax

    events: list[str] = []

    def listener(event: str, duration: float, **kw: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


__all__ = ["count_jax_compilations", "SUPPORTED_MODEL_TYPES", "TINY_CORPUS", "PAD_ID", "BOS_ID", "EOS_ID", "PAD_TOKEN",
           "BOS_TOKEN", "EOS_TOKEN", "UNK_TOKEN", "UNK_ID", "NUM_SPECIAL", "make_tiny_tokenizer",
           "tiny_hf_config",
           "make_tiny_checkpoint", "make_padded_batch"]
