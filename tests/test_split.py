"""The held-out split by prompt (`ppo_rlhf.runtime.split`) and its use by `ppo-rlhf train-rm`:
records of one prompt (one annotation item answered by several people, several pairs sampled for
one prompt) never land on both sides."""

from __future__ import annotations

import types

import numpy as np

from ppo_rlhf.app.cli import main
from ppo_rlhf.data import PairwiseRecord, write_records
from ppo_rlhf.runtime.split import group_key, grouped_holdout_split


def _records(prompts=40, per_prompt=3):
    # as an `annotate export --resolve all` of items each answered by `per_prompt` annotators
    return [PairwiseRecord(prompt=f"review of item {p}", chosen=f"good {p} {a}", rejected=f"bad {p} {a}")
            for a in range(per_prompt) for p in range(prompts)]


def test_no_prompt_is_both_trained_on_and_held_out():
    records = _records()
    keys = [group_key(r) for r in records]
    tr, ev, groups = grouped_holdout_split(keys, 0.1, seed=0)
    assert groups == 4 and len(ev) == 4 * 3 and len(tr) == len(records) - 12
    assert set(tr.tolist()).isdisjoint(ev.tolist()) and sorted([*tr, *ev]) == list(range(len(records)))
    assert {keys[i] for i in tr}.isdisjoint({keys[i] for i in ev})
    assert len({keys[i] for i in ev}) == groups
    np.testing.assert_array_equal(grouped_holdout_split(keys, 0.1, seed=0)[1], ev)  # seeded
    assert not np.array_equal(grouped_holdout_split(keys, 0.1, seed=1)[1], ev)


def test_edge_cases():
    assert grouped_holdout_split(["a"] * 5, 0.5, 0)[2] == 0  # one group: nothing to hold out
    tr, ev, g = grouped_holdout_split(["a", "b", "a", "b"], 0.01, 0)
    assert g == 1 and len(ev) == 2 and len(tr) == 2  # at least one group, never all
    assert grouped_holdout_split(["a", "b"], 0.9, 0)[2] == 1
    assert len(grouped_holdout_split(["a", "b", "c"], 0.0, 0)[1]) == 0


class _FakeTrainer:
    seen: dict = {}

    def __init__(self, model, config, **kwargs):
        _FakeTrainer.config = config

    def fit(self, train, eval, **kwargs):
        _FakeTrainer.seen = {"train": train, "eval": eval}
        return {"eval_accuracy": 0.5, "eval_pairs": len(eval), "train_accuracy": 0.5,
                "reward_gain": 1.0, "reward_bias": 0.0}


def test_train_rm_holds_out_whole_prompts(tmp_path, monkeypatch, capsys):
    """Fails with the old by-record split: 40 prompts x 3 records, a tenth held out by record put
    about 11 of 12 held-out prompts in the training set too."""
    import ppo_rlhf.app.supervised as sup

    monkeypatch.setattr(sup, "get_backend",
                        lambda backend: types.SimpleNamespace(RewardModelTrainer=_FakeTrainer))
    data = tmp_path / "prefs.jsonl"
    write_records(data, _records())
    rc = main(["train-rm", "--backend", "torch", "--model", str(tmp_path),
               "--data", str(data), "--out", str(tmp_path / "rm"), "--no-progress"])
    assert rc == 0
    train, held = _FakeTrainer.seen["train"], _FakeTrainer.seen["eval"]
    assert held and {r.prompt for r in train}.isdisjoint({r.prompt for r in held})
    assert len(train) + len(held) == 120
    assert "held-out pairwise accuracy: 0.5000 on 12 pairs (4 prompts)" in capsys.readouterr().out


def test_train_rm_default_max_length_fits_a_gpt2_model(tmp_path, monkeypatch, capsys):
    import json

    import ppo_rlhf.app.supervised as sup

    monkeypatch.setattr(sup, "get_backend",
                        lambda backend: types.SimpleNamespace(RewardModelTrainer=_FakeTrainer))
    data = tmp_path / "prefs.jsonl"
    write_records(data, _records())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    args = ["train-rm", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "rm"),
            "--no-progress"]
    assert main(args) == 0 and _FakeTrainer.config.max_length == 64  # the demo model's positions
    assert "--max-length 64 (the model's n_positions; default 128)" in capsys.readouterr().out
    assert main([*args, "--max-length", "32"]) == 0 and _FakeTrainer.config.max_length == 32
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # rotary: no limit
    assert main(args) == 0 and _FakeTrainer.config.max_length == 128


def test_pretrain_eval_fraction_holds_out_whole_prompts(tmp_path, monkeypatch, capsys):
    import json

    import ppo_rlhf.app.pipelines as pipelines

    seen = {}

    def fake_pretrain(backend, out, *, train, eval, **kwargs):
        seen.update(train=train, eval=eval)
        return {"stopped": True}

    monkeypatch.setattr(pipelines, "pretrain_model", fake_pretrain)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"prompt {p}", "response": f"answer {p}.{j}"}) + "\n"
                            for j in range(3) for p in range(20)))
    args = ["pretrain", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o"),
            "--eval-samples", "0", "--no-progress"]
    assert main([*args, "--eval-fraction", "0.2"]) == 0
    train, held = seen["train"], seen["eval"]
    assert len(held) == 4 * 3 and len(train) == 48
    assert {p for p, _ in train}.isdisjoint({p for p, _ in held})
    assert "held out 12 of 60 examples (4 prompts)" in capsys.readouterr().out
    assert main(args) == 0 and seen["eval"] is None and len(seen["train"]) == 60  # default: none
    assert main([*args, "--eval-fraction", "0.95"]) == 2
