"""Pretraining / SFT: the neutral pieces (`ppo_rlhf.supervised`: SFTConfig, encoding and its
loss masks, batch order, the fresh GPT-2, the demo model config) and, per backend, the trainer
(loss decreases, masked loss = numpy reference, padding ignored, checkpoints and resume) and
`ppo-rlhf pretrain` end to end, bad input included. Cross-backend checks:
parity_tests/test_reward_model_parity.py (SFT steps)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from ppo_rlhf.app.cli import main
from ppo_rlhf.config import SFTConfig
from ppo_rlhf.data.encoding import encode_sft
from ppo_rlhf.errors import UsageError
from ppo_rlhf.hf_checkpoint import init_gpt2_tensors, write_fresh_checkpoint
from ppo_rlhf.runtime.seeds import sft_batch_indices
from ppo_rlhf.tasks import reviews

BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module")
def task_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    reviews.build_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def fresh_tiny(tmp_path_factory, task_tok):
    """A fresh 'tiny' demo model with the task tokenizer."""
    cfg = reviews.demo_model_config("tiny", vocab_size=len(task_tok))
    return write_fresh_checkpoint(tmp_path_factory.mktemp("fresh"), cfg, seed=0, tokenizer=task_tok)


# ---- config, encoding, order ------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("learning_rate", -1e-3), ("num_steps", -1), ("batch_size", 0),
                                         ("min_lr_ratio", 1.5), ("train_on_prompt", "yes"),
                                         ("max_length", 0), ("adam_eps", -1.0)])
def test_sft_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SFTConfig.{field}="):
        SFTConfig(**{field: value})


def test_encode_sft_loss_masks(task_tok):
    cfg = SFTConfig(max_length=16)
    d = encode_sft(["the phone is good.", ("review of the mug:", "the mug is bad."),
                    {"prompt": "about the tent:", "response": "i love it."}, {"text": "okay."}],
                   task_tok, cfg)
    enc = lambda s: task_tok(s, add_special_tokens=False)["input_ids"]
    eos = task_tok.eos_token_id
    text = enc("the phone is good.") + [eos]
    assert d.input_ids[0, :len(text)].tolist() == text and d.attention_mask[0].sum() == len(text)
    # plain text: every token after the first is a target
    assert d.loss_mask[0].tolist() == [0] + [1] * (len(text) - 1) + [0] * (16 - len(text))
    # (prompt, response): the response and EOS only
    p, r = enc("review of the mug:"), enc("the mug is bad.")
    assert d.input_ids[1, :len(p) + len(r) + 1].tolist() == p + r + [eos]
    assert d.loss_mask[1].tolist() == [0] * len(p) + [1] * (len(r) + 1) + [0] * (16 - len(p) - len(r) - 1)
    assert d.loss_mask[2, :len(enc("about the tent:"))].sum() == 0
    # train_on_prompt: everything after the first token
    d2 = encode_sft([("review of the mug:", "the mug is bad.")], task_tok,
                    SFTConfig(max_length=16, train_on_prompt=True))
    assert d2.loss_mask[0].tolist() == [0] + [1] * (len(p) + len(r)) + [0] * (15 - len(p) - len(r))
    # too long: the end is cut (counted)
    d3 = encode_sft(["the phone is good. " * 10], task_tok, SFTConfig(max_length=8))
    assert d3.truncated == 1 and d3.attention_mask.all() and d3.input_ids[0, -1] != eos
    with pytest.raises(UsageError, match="example 1"):
        encode_sft(["ok", 42], task_tok, cfg)
    with pytest.raises(UsageError, match="no training examples"):
        encode_sft([], task_tok, cfg)


def test_sft_batch_order_is_seeded_and_covers_each_epoch():
    n, B = 10, 4
    rows = np.concatenate([sft_batch_indices(3, s, n, B) for s in range(5)])  # 20 = 2 epochs
    assert sorted(rows[:10].tolist()) == list(range(10)) == sorted(rows[10:].tolist())
    assert not np.array_equal(rows[:10], rows[10:])
    np.testing.assert_array_equal(sft_batch_indices(3, 2, n, B), rows[8:12])
    assert not np.array_equal(sft_batch_indices(4, 0, n, B), rows[:4])


def test_fresh_gpt2_loads_in_both_backends_and_transformers(fresh_tiny, task_tok):
    import torch
    from transformers import AutoModelForCausalLM

    from ppo_jax.models import load_pretrained as jload
    from ppo_torch.models import load_pretrained as tload

    ids = np.asarray([task_tok("review of the mug: the mug is good.", add_special_tokens=False)["input_ids"]])
    lj = np.asarray(jload(fresh_tiny)(ids))
    with torch.no_grad():
        lt = tload(fresh_tiny)(torch.from_numpy(ids)).numpy()
        lh = AutoModelForCausalLM.from_pretrained(str(fresh_tiny))(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(lj, lt, atol=1e-5)
    np.testing.assert_allclose(lh, lt, atol=1e-5)
    # GPT-2 init: small logits at the start (std 0.02 weights, unit LayerNorm)
    assert np.abs(lj).max() < 1.0


def test_demo_model_sizes():
    small = reviews.demo_model_config("small", vocab_size=121)
    n = sum(v.size for v in init_gpt2_tensors(small, 0).values())
    assert 500_000 < n <= 1_000_000, n
    tiny = sum(v.size for v in init_gpt2_tensors(reviews.demo_model_config("tiny", vocab_size=121), 0).values())
    assert tiny < 50_000
    with pytest.raises(ValueError, match="size="):
        reviews.demo_model_config("huge", vocab_size=121)
    assert reviews.demo_model_config("tiny")["vocab_size"] == reviews.build_tokenizer().get_vocab_size()


# ---- per-backend trainer -----------------------------------------------------------------------
def _sft(backend):
    return importlib.import_module(f"ppo_{backend}.sft")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_decreases_on_a_toy_corpus(fresh_tiny, backend):
    texts = reviews.corpus_texts(64, seed=0)
    cfg = SFTConfig(num_steps=60, batch_size=16, max_length=32, learning_rate=1e-2, warmup_steps=5)
    t = _sft(backend).SFTTrainer(str(fresh_tiny), cfg)
    m = t.fit(texts, texts[:16], progress=False)
    losses = [h["train/loss"] for h in t.history]
    assert len(losses) == 60 and m["steps"] == 60
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert m["eval_loss"] < 0.6 * losses[0]
    assert [h["train/lr"] for h in t.history][:2] == pytest.approx([2e-3, 4e-3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_loss_matches_numpy_and_ignores_padding(fresh_tiny, task_tok, backend):
    data = encode_sft(["the phone is good.", ("review of the mug:", "the mug is bad. i hate it.")],
                      task_tok, SFTConfig(max_length=20))
    batch = data.batch(np.arange(2))
    loss, logits = _loss_and_logits(backend, fresh_tiny, batch)
    # numpy reference: -mean over targets t of log softmax(logits[t - 1])[ids[t]]
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    terms = [-lp[b, t - 1, batch["input_ids"][b, t]] for b in range(2) for t in range(1, 20)
             if batch["loss_mask"][b, t]]
    assert loss == pytest.approx(float(np.mean(terms)), rel=1e-5)
    # garbage at padded positions changes nothing
    other = {k: v.copy() for k, v in batch.items()}
    other["input_ids"] = np.where(other["attention_mask"] == 1, other["input_ids"], 7)
    assert _loss_and_logits(backend, fresh_tiny, other)[0] == pytest.approx(loss, rel=1e-6)
    # but a prompt token (not a target, yet context) does, and so does the mask
    other["input_ids"][1, 1] = 9
    assert abs(_loss_and_logits(backend, fresh_tiny, other)[0] - loss) > 1e-6
    other = {k: v.copy() for k, v in batch.items()}
    other["loss_mask"][1] = 0
    assert abs(_loss_and_logits(backend, fresh_tiny, other)[0] - loss) > 1e-6


def _loss_and_logits(backend, ckpt, batch):
    if backend == "jax":
        import jax.numpy as jnp

        from ppo_jax.models import load_pretrained
        from ppo_jax.sft import sft_loss

        model = load_pretrained(ckpt)
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        logits = np.asarray(model(b["input_ids"], attention_mask=b["attention_mask"]), np.float64)
        return float(sft_loss(model, b)[0]), logits
    import torch

    from ppo_torch.models import load_pretrained
    from ppo_torch.sft import _tensors, sft_loss

    model = load_pretrained(ckpt)
    b = _tensors(batch, torch.device("cpu"))
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).numpy().astype(np.float64)
        return sft_loss(model, b)[0].item(), logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_and_resume_repeat_an_uninterrupted_run(fresh_tiny, tmp_path, backend):
    sft = _sft(backend)
    texts = reviews.corpus_texts(40, seed=2)
    base = dict(batch_size=8, max_length=32, learning_rate=3e-3, lr_schedule="cosine", warmup_steps=2)
    straight = sft.SFTTrainer(str(fresh_tiny), SFTConfig(**base, num_steps=6))
    straight.fit(texts, progress=False)
    out = tmp_path / "run"
    first = sft.SFTTrainer(str(fresh_tiny), SFTConfig(**base, num_steps=6), out_dir=out, checkpoint_every=3)
    # interrupt after step 3: a stop raised from inside the loop, as a crash would
    orig = first._train_step
    calls = []

    def crash_after_3(batch, lr):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return orig(batch, lr)

    first._train_step = crash_after_3
    with pytest.raises(KeyboardInterrupt):
        first.fit(texts, progress=False)
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "iter_00000003"
    resumed = sft.SFTTrainer(str(fresh_tiny), SFTConfig(**base, num_steps=6), out_dir=out)
    resumed.fit(texts, progress=False, resume=True)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["train/lr"] for h in resumed.history] == [h["train/lr"] for h in straight.history[3:]]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    if backend == "jax":
        from ppo_jax.models import model_tensors
    else:
        from ppo_torch.models import model_tensors
    a, b = model_tensors(straight.model()), model_tensors(resumed.model())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


# ---- the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_pretrain_from_scratch_then_sft(tmp_path, capsys, backend):
    out = tmp_path / "pt"
    rc = main(["pretrain", "--backend", backend, "--out", str(out), "--model-size", "tiny",
               "--steps", "8", "--corpus-size", "200", "--batch-size", "8", "--eval-samples", "6",
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 8 and m["backend"] == backend and m["num_examples"] == 200
    for key in ("final_loss", "eval_loss", "gold_mean", "gold_positive_frac", "gold_well_formed_frac"):
        assert isinstance(m[key], float), key
    assert "8 steps in" in printed and "mean gold" in printed
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(str(out)).config.n_embd == 32
    assert len(AutoTokenizer.from_pretrained(str(out))) == reviews.build_tokenizer().get_vocab_size()
    if backend == "jax":
        return  # the SFT path (--model, --data) is backend-neutral glue: once is enough
    # SFT: the pretrained model on a prompt/response file
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r})
                              for p, r in reviews.generate_corpus(20, seed=5)) + "\n"
                    + json.dumps({"text": "review of the mug: the mug is great."}) + "\n")
    out2 = tmp_path / "sft"
    rc = main(["pretrain", "--backend", backend, "--model", str(out), "--data", str(data),
               "--out", str(out2), "--steps", "3", "--batch-size", "4", "--eval-samples", "0",
               "--no-progress"])
    assert rc == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["num_examples"] == 21 and m2["steps"] == 3 and "gold_mean" not in m2


@pytest.mark.parametrize("case", ["missing-model", "missing-data", "malformed", "empty", "bad-record",
                                  "unknown-task", "bad-steps"])
def test_cli_pretrain_bad_input_is_a_one_line_error(tmp_path, capsys, case):
    args = ["pretrain", "--backend", "jax", "--out", str(tmp_path / "out"), "--model-size", "tiny",
            "--steps", "1", "--no-progress"]
    if case == "missing-model":
        args += ["--model", str(tmp_path / "nope")]
        expect = "is not a directory"
    elif case == "missing-data":
        args += ["--data", str(tmp_path / "nope.jsonl")]
        expect = "no such file"
    elif case == "malformed":
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
        args += ["--data", str(tmp_path / "bad.jsonl")]
        expect = "bad.jsonl:2: invalid JSON"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args += ["--data", str(tmp_path / "empty.jsonl")]
        expect = "no examples"
    elif case == "bad-record":
        (tmp_path / "rec.jsonl").write_text('{"prompt": "p"}\n')
        args += ["--data", str(tmp_path / "rec.jsonl")]
        expect = "rec.jsonl:1: expected"
    elif case == "unknown-task":
        args += ["--task", "nosuchtask"]
        expect = "unknown task"
    else:
        args[args.index("--steps") + 1] = "-3"
        expect = "--steps"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("ppo-rlhf pretrain: error: ") and err.count("\n") == 1, err
    assert expect in err, err
