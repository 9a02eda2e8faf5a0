"""Reward-model training: the neutral pieces (`ppo_rlhf.supervised`: configs, encoding, batch
order, accuracy, normalisation) and, per backend, the trainer (loss decreases, masks, normalised
scores, checkpoints and resume, saved model loads in transformers) and `ppo-rlhf train-rm`
end to end, bad input included. Cross-backend checks: parity_tests/test_reward_model_parity.py."""

from __future__ import annotations

import importlib
import json
import math
import warnings

import numpy as np
import pytest

from ppo_rlhf.app.cli import main
from ppo_rlhf.config import RMConfig
from ppo_rlhf.data import PairwiseRecord, RankingRecord, RatingRecord, write_records
from ppo_rlhf.data.encoding import encode_preferences, encode_sequences
from ppo_rlhf.errors import UsageError
from ppo_rlhf.eval.preferences import group_accuracy, normalisation, pairwise_accuracy, rating_pair_accuracy
from ppo_rlhf.feedback.labeller import SYNTHETIC_LABELS, expected_accuracy
from ppo_rlhf.runtime.seeds import rm_batch_rows
from ppo_rlhf.runtime.supervised import lr_factor
from tests.helpers import run_module

BACKENDS = ("jax", "torch")


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint("gpt2")))


def toy_pairs(n=24, seed=0):
    """Chosen: a positive review; rejected: a negative one (easy to learn)."""
    rng = np.random.default_rng(seed)
    items, good, bad = ["phone", "lamp", "mug", "tent"], ["great", "good", "lovely"], ["awful", "bad", "poor"]
    out = []
    for _ in range(n):
        it = items[rng.integers(4)]
        out.append(PairwiseRecord(f"review of the {it}:", f" the {it} is {good[rng.integers(3)]}.",
                                  f" the {it} is {bad[rng.integers(3)]}."))
    return out


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("loss", "hinge"), ("ties", "half"), ("learning_rate", -1.0),
                                         ("batch_size", 0), ("max_length", 1), ("num_epochs", 0),
                                         ("eval_fraction", 0.95), ("max_grad_norm", 0.0),
                                         ("lr_schedule", "step"), ("seed", -1), ("normalise", 1),
                                         ("warmup_steps", 1.5), ("learning_rate", math.nan)])
def test_rm_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"RMConfig.{field}="):
        RMConfig(**{field: value})


def test_margin_key_only_with_bradley_terry():
    RMConfig(margin_key="margin")
    with pytest.raises(ValueError, match="margin_key"):
        RMConfig(loss="plackett_luce", margin_key="margin")
    assert RMConfig.from_dict(RMConfig(lr_schedule="cosine").to_dict()) == RMConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="unknown field"):
        RMConfig.from_dict({"lr": 1.0})


def test_lr_factor_warmup_then_decay():
    c = RMConfig(warmup_steps=4, lr_schedule="linear", min_lr_ratio=0.0)
    f = [float(lr_factor(s, 10, c)) for s in range(10)]
    np.testing.assert_allclose(f[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert f[-1] == 0.0 and all(a > b for a, b in zip(f[4:], f[5:]))
    cos = RMConfig(lr_schedule="cosine", min_lr_ratio=0.1)
    assert float(lr_factor(0, 10, cos)) == 1.0 and float(lr_factor(9, 10, cos)) == pytest.approx(0.1)
    assert float(lr_factor(100, 10, cos)) == pytest.approx(0.1)  # past the end: stays at the floor
    assert float(lr_factor(7, 10, RMConfig(lr_schedule="constant"))) == 1.0


# ---- encoding ----------------------------------------------------------------------------------
def test_encode_pairs_rankings_ties_and_absent_slots(tok):
    recs = [PairwiseRecord("p one", " a", " b"),
            RankingRecord("p two", (" x", " y", " z"), (2, (0, 1))),
            PairwiseRecord("p three", " c", " d", tie=True)]
    g = encode_preferences(recs, tok, RMConfig(max_length=16, ties="keep"))
    assert g.input_ids.shape == (3, 3, 16) and g.attention_mask.shape == (3, 3, 16)
    np.testing.assert_array_equal(g.tiers, [[0, 1, -1], [1, 1, 0], [0, 0, -1]])
    # absent slot = a copy of slot 0 (finite forward, never in a loss)
    np.testing.assert_array_equal(g.input_ids[0, 2], g.input_ids[0, 0])
    # a sequence = prompt ids + response ids + EOS, right-padded
    ids = tok("p one", add_special_tokens=False)["input_ids"] + tok(" a", add_special_tokens=False)["input_ids"]
    n = len(ids) + 1
    assert list(g.input_ids[0, 0, :n]) == ids + [tok.eos_token_id]
    assert g.attention_mask[0, 0].tolist() == [1] * n + [0] * (16 - n)
    # ties="drop": the tied pair has nothing to learn and is dropped (counted)
    d = encode_preferences(recs, tok, RMConfig(max_length=16))
    assert len(d) == 2 and d.dropped == 1


def test_long_sequences_keep_their_end(tok):
    long = " good" * 40
    ids, mask, truncated = encode_sequences(tok, ["prompt"], [long], max_length=8)
    assert truncated == 1 and mask.all()
    full = tok("prompt", add_special_tokens=False)["input_ids"] + tok(long, add_special_tokens=False)["input_ids"]
    assert list(ids[0]) == (full + [tok.eos_token_id])[-8:]


def test_ratings_standardised_or_turned_into_pairs(tok):
    recs = [RatingRecord("p", " a", 1.0), RatingRecord("p", " b", 3.0), RatingRecord("q", " c", 5.0)]
    g = encode_preferences(recs, tok, RMConfig(loss="rating", max_length=8))
    r = np.array([1.0, 3.0, 5.0])
    np.testing.assert_allclose(g.targets, (r - r.mean()) / r.std(), rtol=1e-6)
    assert g.group_size == 1 and (g.rating_mean, g.rating_std) == (3.0, pytest.approx(r.std()))
    e = encode_preferences(recs[:2], tok, RMConfig(loss="rating", max_length=8), rating_stats=(3.0, 2.0))
    np.testing.assert_allclose(e.targets, [-1.0, 0.0])
    pairs = encode_preferences(recs, tok, RMConfig(max_length=8))  # same prompt, different ratings
    assert len(pairs) == 1 and pairs.responses == [[" b", " a"]]
    with pytest.raises(UsageError, match="rating records"):
        encode_preferences(toy_pairs(2), tok, RMConfig(loss="rating"))


def test_margins_read_from_extra(tok):
    recs = [PairwiseRecord("p", " a", " b", extra={"margin": 2}),
            PairwiseRecord("p", " c", " d", extra={"margin": 0.5})]
    g = encode_preferences(recs, tok, RMConfig(margin_key="margin", max_length=8))
    np.testing.assert_array_equal(g.margin, [2.0, 0.5])
    with pytest.raises(UsageError, match="margin"):
        encode_preferences([PairwiseRecord("p", " a", " b")], tok, RMConfig(margin_key="margin"))


def test_no_usable_records_is_a_usage_error(tok):
    with pytest.raises(UsageError, match="all ties"):
        encode_preferences([PairwiseRecord("p", " a", " b", tie=True)], tok, RMConfig())


# ---- batch order, split, metrics ---------------------------------------------------------------
def test_batch_rows_cover_each_epoch_once_and_pad_the_last_batch():
    n, B = 10, 4
    for epoch in range(2):
        steps = [rm_batch_rows(7, epoch * 3 + b, n, B) for b in range(3)]
        assert all(e == epoch for _, _, e in steps)
        real = np.concatenate([r[w > 0] for r, w, _ in steps])
        assert sorted(real.tolist()) == list(range(n))
        assert steps[-1][1].tolist() == [1, 1, 0, 0]
    a, b = rm_batch_rows(7, 0, n, B)[0], rm_batch_rows(7, 3, n, B)[0]
    assert not np.array_equal(a, b)  # a fresh permutation per epoch
    np.testing.assert_array_equal(rm_batch_rows(7, 4, n, B)[0], rm_batch_rows(7, 4, n, B)[0])
    assert not np.array_equal(rm_batch_rows(8, 0, n, B)[0], a)


def test_group_accuracy_counts_equal_scores_half_and_skips_ties():
    scores = np.array([[2.0, 1.0, 0.0], [1.0, 1.0, 5.0], [0.0, 3.0, 9.0]])
    tiers = np.array([[0, 1, -1], [0, 1, 1], [0, 0, 1]])
    # row 0: 1 correct; row 1: (0,1) equal -> 1/2, (0,2) wrong; row 2: (0,2), (1,2) wrong (tie 0-1 skipped)
    acc, n = group_accuracy(scores, tiers)
    assert n == 5 and acc == pytest.approx(1.5 / 5)
    acc, n = group_accuracy(scores, tiers, weight=np.array([1, 0, 1]))
    assert n == 3 and acc == pytest.approx(1 / 3)
    assert pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    acc, n = rating_pair_accuracy(["p", "p", "q", "p"], [1, 2, 3, 2], [0.0, 1.0, 7.0, -1.0])
    assert n == 2 and acc == 0.5


def test_normalisation_gives_mean_zero_std_one():
    s = np.random.default_rng(0).normal(3.0, 2.5, 1000)
    g, b = normalisation(s)
    z = g * s + b
    assert abs(z.mean()) < 1e-12 and z.std() == pytest.approx(1.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert normalisation([2.0, 2.0]) == (1.0, -2.0)
    assert "same" in str(w[0].message)


# ---- per-backend trainer -----------------------------------------------------------------------
def _rm(backend):
    return importlib.import_module(f"ppo_{backend}.reward_model")


def _trainer(backend, ckpt, config, **kw):
    return _rm(backend).RewardModelTrainer(str(ckpt), config, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_decreases_and_model_learns_a_toy_preference(tiny_checkpoint, backend):
    cfg = RMConfig(learning_rate=3e-3, batch_size=8, max_length=24, num_epochs=6, lr_schedule="constant")
    t = _trainer(backend, tiny_checkpoint("gpt2"), cfg)
    m = t.fit(toy_pairs(24), toy_pairs(16, seed=1), progress=False)
    losses = [h["train/loss"] for h in t.history]
    assert len(losses) == 18
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert m["eval_accuracy"] == 1.0 and m["train_accuracy"] == 1.0
    assert m["steps"] == 18 and m["num_train"] == 24 and m["num_eval"] == 16
    if backend == "jax":  # held-out batches are scored flat: one forward program for evaluation
        # and for the normalisation's sequence_scores (no second compilation of the model)
        assert t._score_fn._cache_size() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce", "best_of_k"])
def test_masks_padding_absent_slots_and_zero_weight_rows_do_not_matter(tiny_checkpoint, tok, backend, loss):
    """The loss and its gradient ignore: tokens at padded positions, the content of absent slots
    (tier -1), and rows of weight 0 -- each changed to garbage here."""
    cfg = RMConfig(loss=loss, max_length=16, ties="keep")
    recs = [RankingRecord("p", (" a good", " b", " c bad"), (0, 1, 2)),
            PairwiseRecord("q", " yes", " no"), PairwiseRecord("r", " x", " y", tie=True)]
    g = encode_preferences(recs, tok, cfg)
    batch = g.batch(np.arange(3), np.array([1.0, 1.0, 0.0]))
    other = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(0)
    garbage = rng.integers(4, 500, size=other["input_ids"].shape)
    other["input_ids"] = np.where(other["attention_mask"] == 1, other["input_ids"], garbage)
    other["input_ids"][1, 2] = garbage[1, 2]          # absent slot of the pair
    other["input_ids"][2] = garbage[2]                # the weight-0 row
    other["margin"][2] = 100.0
    l1, g1 = _loss_and_grads(backend, tiny_checkpoint("gpt2"), batch, cfg)
    l2, g2 = _loss_and_grads(backend, tiny_checkpoint("gpt2"), other, cfg)
    assert l1 == pytest.approx(l2, rel=1e-6, abs=1e-7)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # guard: a real token does matter
    other["input_ids"][0, 0, 0] = garbage[0, 0, 0]
    assert abs(_loss_and_grads(backend, tiny_checkpoint("gpt2"), other, cfg)[0] - l1) > 1e-6


_JITTED: dict = {}


def _loss_and_grads(backend, ckpt, batch, cfg):
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from ppo_jax.models import scalar_model_from_lm
        from ppo_jax.reward_model import batch_loss

        gdef, params, rest = nnx.split(scalar_model_from_lm(ckpt, seed=0), nnx.Param, ...)
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        key = (gdef, cfg)
        if key not in _JITTED:
            _JITTED[key] = jax.jit(jax.value_and_grad(
                lambda p, r, b: batch_loss(nnx.merge(gdef, p, r), b, loss=cfg.loss, ties=cfg.ties), has_aux=True))
        (loss, _), grads = _JITTED[key](params, rest, b)
        return float(loss), {str(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(grads)}
    import torch

    from ppo_torch.models import scalar_model_from_lm
    from ppo_torch.reward_model import _tensors, batch_loss

    model = scalar_model_from_lm(ckpt, seed=0)
    loss, _ = batch_loss(model, _tensors(batch, torch.device("cpu")), loss=cfg.loss, ties=cfg.ties)
    loss.backward()
    return loss.item(), {n: p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_rating_regression_learns_the_rating_order(tiny_checkpoint, tmp_path, backend):
    rng = np.random.default_rng(0)
    words = {1.0: "awful", 2.0: "bad", 4.0: "good", 5.0: "great"}
    recs = [RatingRecord(f"review of item {i % 4}:", f" it is {words[r]}.", r)
            for i, r in enumerate(rng.choice(list(words), 32))]
    cfg = RMConfig(loss="rating", learning_rate=3e-3, batch_size=8, max_length=24, num_epochs=6,
                   lr_schedule="constant", eval_fraction=0.0)
    t = _trainer(backend, tiny_checkpoint("gpt2"), cfg, out_dir=tmp_path / "rm")
    m = t.fit(recs[:24], recs[24:], progress=False)
    losses = [h["train/loss"] for h in t.history]
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses
    assert m["eval_accuracy"] > 0.9 and m["eval_pairs"] > 0 and m["rating_std"] > 0
    # per-step records are strict JSON (a K = 1 batch has no pair: its accuracy is null)
    first = json.loads((tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/accuracy"] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_model_is_normalised_and_loads_in_transformers(tiny_checkpoint, tmp_path, backend):
    import torch
    from transformers import AutoModelForSequenceClassification

    import ppo_torch.models as tm

    out = tmp_path / "rm"
    cfg = RMConfig(learning_rate=1e-3, batch_size=8, max_length=24)
    t = _trainer(backend, tiny_checkpoint("gpt2"), cfg, out_dir=out)
    train = toy_pairs(16)
    m = t.fit(train, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["ppo_rlhf"] == {"reward_gain": m["reward_gain"], "reward_bias": m["reward_bias"]}
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert (out / "tokenizer.json").is_file() and (out / "metrics.json").is_file()
    # the training sequences, scored by the saved model (in this backend), have mean 0, std 1
    rm = _rm(backend)
    loaded = rm.init_reward_model(out)
    assert (loaded.reward_gain, loaded.reward_bias) == (m["reward_gain"], m["reward_bias"])
    prompts = [r.prompt for r in train for _ in range(2)]
    responses = [x for r in train for x in (r.chosen, r.rejected)]
    ids, mask, _ = encode_sequences(t.tokenizer, prompts, responses, max_length=24)
    if backend == "torch":
        with torch.no_grad():
            s = loaded.score(torch.from_numpy(ids), torch.from_numpy(mask)).numpy().astype(np.float64)
    else:
        s = np.asarray(loaded.score(ids, mask), np.float64)
    assert abs(s.mean()) < 1e-4 and s.std() == pytest.approx(1.0, abs=1e-4)
    # transformers: the raw head at the last token (HF pools at the last non-pad token)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    row = 0
    n = int(mask[row].sum())
    with torch.no_grad():
        raw = hf(torch.from_numpy(ids[row:row + 1, :n]).long()).logits[0, 0].item()
    assert m["reward_gain"] * raw + m["reward_bias"] == pytest.approx(s[row], abs=1e-4)
    assert isinstance(tm.load_scalar_model(out), tm.ScalarHeadModel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_and_resume_repeat_an_uninterrupted_run(tiny_checkpoint, tmp_path, backend):
    rm = _rm(backend)
    data = toy_pairs(20)
    base = dict(learning_rate=1e-3, batch_size=4, max_length=24, lr_schedule="constant",
                normalise=False, eval_fraction=0.0)
    straight = _trainer(backend, tiny_checkpoint("gpt2"), RMConfig(**base, max_steps=4))
    straight.fit(data, progress=False)
    out = tmp_path / "run"
    first = _trainer(backend, tiny_checkpoint("gpt2"), RMConfig(**base, max_steps=2), out_dir=out,
                     checkpoint_every=1)
    first.fit(data, progress=False)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("iter_*"))
    assert ckpts == ["iter_00000001", "iter_00000002"]
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "iter_00000002"
    assert rm.init_reward_model(out / "checkpoints" / "iter_00000002" / "model") is not None
    resumed = _trainer(backend, tiny_checkpoint("gpt2"), RMConfig(**base, max_steps=4), out_dir=out)
    resumed.fit(data, progress=False, resume=True)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    a, b = _weights(backend, straight.model()), _weights(backend, resumed.model())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _weights(backend, model):
    if backend == "jax":
        from ppo_jax.models import model_tensors
    else:
        from ppo_torch.models import model_tensors
    return model_tensors(model)


# ---- the CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    from ppo_rlhf.tasks import reviews

    d = tmp_path_factory.mktemp("prefs")
    write_records(d / "train.jsonl", reviews.preference_data(40, seed=0).records)
    write_records(d / "eval.jsonl", reviews.preference_data(12, seed=1, split="eval").records)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_train_rm_end_to_end(tiny_checkpoint, prefs, tmp_path, capsys, backend):
    out = tmp_path / "rm"
    rc = main(["train-rm", "--backend", backend, "--model", str(tiny_checkpoint("gpt2")),
               "--data", str(prefs / "train.jsonl"), "--eval-data", str(prefs / "eval.jsonl"),
               "--out", str(out), "--epochs", "2", "--batch-size", "8", "--max-length", "48",
               "--lr", "1e-3", "--seed", "1", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert f"held-out pairwise accuracy: {m['eval_accuracy']:.4f} on 12 pairs" in printed
    assert "noise ceiling" in printed and 0.5 < m["noise_ceiling"] <= 1.0
    assert f"expected over the label noise {m['eval_expected_accuracy']:.4f}" in printed
    assert 1.0 - m["noise_ceiling"] <= m["eval_expected_accuracy"] <= m["noise_ceiling"]
    for key in ("eval_accuracy", "train_loss", "train_accuracy", "eval_loss", "reward_gain", "reward_bias"):
        assert m[key] is not None, key
    assert m["steps"] == 10 and m["backend"] == backend
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert "eval/accuracy" in lines[4] and "eval/accuracy" in lines[9]  # end of each epoch
    assert json.loads((out / "train_config.json").read_text())["seed"] == 1


def test_cli_train_rm_holds_out_a_fraction_without_eval_data(tiny_checkpoint, prefs, tmp_path, capsys):
    out = tmp_path / "rm"
    rc = main(["train-rm", "--backend", "torch", "--model", str(tiny_checkpoint("gpt2")),
               "--data", str(prefs / "train.jsonl"), "--out", str(out), "--eval-fraction", "0.25",
               "--max-length", "48", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["num_train"], m["num_eval"]) == (30, 10)


@pytest.mark.parametrize("case", ["missing-model", "missing-data", "malformed", "empty", "bad-lr",
                                  "bad-lora-rank", "no-tokenizer", "wrong-kind"])
def test_cli_train_rm_bad_input_is_a_one_line_error(tiny_checkpoint, prefs, tmp_path, capsys, case):
    model, data = str(tiny_checkpoint("gpt2")), str(prefs / "train.jsonl")
    extra: list[str] = []
    expect = None
    if case == "missing-model":
        model, expect = str(tmp_path / "nope"), "is not a directory"
    elif case == "missing-data":
        data, expect = str(tmp_path / "nope.jsonl"), "no such file"
    elif case == "malformed":
        data = str(tmp_path / "bad.jsonl")
        (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
        expect = "bad.jsonl:2: invalid JSON"
    elif case == "empty":
        data = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("\n")
        expect = "no records"
    elif case == "bad-lr":
        extra, expect = ["--lr", "-1"], "RMConfig.learning_rate=-1.0 is invalid"
    elif case == "bad-lora-rank":
        extra, expect = ["--lora-rank", "two"], "RMConfig.lora_rank='two' is invalid: allowed an integer >= 0"
    elif case == "no-tokenizer":
        from ppo_rlhf.testing import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(tmp_path / "notok", "gpt2", with_tokenizer=False))
        expect = "tokenizer"
    elif case == "wrong-kind":
        data = str(tmp_path / "prompts.jsonl")
        (tmp_path / "prompts.jsonl").write_text('{"prompt": "p"}\n')
        expect = "holds no preference"
    capsys.readouterr()  # drop what building the fixtures printed
    rc = main(["train-rm", "--backend", "jax", "--model", model, "--data", data,
               "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("ppo-rlhf train-rm: error: ") and err.count("\n") == 1, err
    assert expect in err, err


# ---- "done when": held-out accuracy near the labeller's noise ceiling (slow) ------------------------
@pytest.fixture(scope="module")
def pretrained_tiny_demo(tmp_path_factory):
    """The tiny demo model pretrained on the reviews corpus for 400 steps (JAX, ~10 s)."""
    from transformers import AutoTokenizer

    from ppo_jax.sft import train_sft
    from ppo_rlhf.config import SFTConfig
    from ppo_rlhf.hf_checkpoint import write_fresh_checkpoint
    from ppo_rlhf.tasks import reviews

    d = tmp_path_factory.mktemp("demo")
    reviews.build_tokenizer(d / "tok")
    tok = AutoTokenizer.from_pretrained(str(d / "tok"))
    init = write_fresh_checkpoint(d / "init", reviews.demo_model_config("tiny", vocab_size=len(tok)),
                                  seed=0, tokenizer=tok)
    train_sft(str(init), reviews.corpus_texts(5000, seed=0), tokenizer=tok, out_dir=d / "pt",
              config=SFTConfig(num_steps=400, batch_size=32, max_length=32, learning_rate=3e-3,
                               warmup_steps=20), progress=False)
    return d / "pt"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_held_out_accuracy_approaches_the_noise_ceiling(pretrained_tiny_demo, backend):
    """A fast version of the issue's "done when" (the full-size numbers are in the report of the
    commit that added this): a reward model trained on 3000 synthetic pairs of the reviews task
    (labeller temperature 0.2) from the TINY pretrained demo model, evaluated on 500 pairs of the
    held-out eval prompts. Measured: 0.73 against a noise ceiling of 0.855 (the demo-sized model
    reaches 0.76-0.77 against 0.85; what it misses are word-level corruptions -- a repeated,
    dropped or swapped word -- that the gold reward punishes). Asserted: within 0.15 of the
    ceiling, and far above the same model before training (0.49)."""
    from ppo_rlhf.tasks import reviews

    train = reviews.preference_data(3000, seed=0).records
    held_out = reviews.preference_data(500, seed=1, split="eval")
    cfg = RMConfig(num_epochs=2, batch_size=32, max_length=32, learning_rate=1e-3)
    t = _rm(backend).RewardModelTrainer(str(pretrained_tiny_demo), cfg)
    before = t.evaluate(t.encode(held_out.records))["accuracy"]
    m = t.fit(train, held_out.records, progress=False, label_quality=SYNTHETIC_LABELS)
    assert m["noise_ceiling"] == pytest.approx(held_out.noise_ceiling)
    # the expected accuracy is that of the final model's scores on the held-out pairs
    recs = held_out.records
    s_c = t.sequence_scores([r.prompt for r in recs], [r.chosen for r in recs])
    s_r = t.sequence_scores([r.prompt for r in recs], [r.rejected for r in recs])
    assert m["eval_expected_accuracy"] == pytest.approx(
        expected_accuracy(recs, np.stack([s_c, s_r], 1)), abs=1e-9)
    assert m["eval_accuracy"] >= m["noise_ceiling"] - 0.15, m
    assert m["eval_accuracy"] >= before + 0.1, (before, m["eval_accuracy"])


@pytest.mark.benchmark
def test_rm_accuracy_benchmark_comes_close_to_the_noise_ceiling(tmp_path):
    """The issue's "done when" at full size, as README reports it: `python -m benchmarks.rm_accuracy`
    pretrains the demo model (1000 steps), then `ppo-rlhf train-rm` in each backend from it on
    16000 synthetic pairs (4 epochs), held out on 1000 pairs of the eval prompts (~11 min on 2
    CPUs). Measured: expected accuracy 0.826 in both backends (held-out 0.819 JAX, 0.825 torch)
    against a noise ceiling of 0.858. Asserted: the expected accuracy (no label-sampling noise)
    within 0.05 of the ceiling in each backend, the measured one within 0.065 (its binomial sd
    on 1000 pairs is ~0.012), and the two backends within 0.01 of each other."""
    out = tmp_path / "rm-accuracy.json"
    run_module("benchmarks.rm_accuracy", "--no-progress", "--out", out, "--cache-dir", tmp_path / "cache",
               timeout=3000)
    results = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in results] == ["jax", "torch"]
    for r in results:
        assert r["eval_pairs"] == 1000 and r["steps"] == 4000, r
        assert r["eval_expected_accuracy"] >= r["noise_ceiling"] - 0.05, r
        assert r["eval_accuracy"] >= r["noise_ceiling"] - 0.065, r
    assert abs(results[0]["eval_expected_accuracy"] - results[1]["eval_expected_accuracy"]) <= 0.01
