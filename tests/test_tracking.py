"""`--report-to tensorboard`: every metrics record of `train`, `train-rm` and `pretrain` also as
TensorBoard scalars, in both backends; read back with TensorBoard's own event reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import SMALL, cli, write_prompts

BACKENDS = ["jax", "torch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tracking")
    (d / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a good answer",
                                                       "rejected": "bad"}) + "\n" for i in range(8)))
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "a good answer"})
                                         + "\n" for i in range(8)))
    return {"model": tiny_checkpoint("gpt2"), "prompts": write_prompts(d), "prefs": d / "prefs.jsonl",
            "sft": d / "sft.jsonl"}


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


COMMANDS = {
    "train": lambda d: ["--policy", d["model"], "--reward-fn", "tests.helpers:length_reward",
                        "--prompts", d["prompts"], "--iterations", "2", *SMALL],
    "train-rm": lambda d: ["--model", d["model"], "--data", d["prefs"], "--epochs", "1",
                           "--batch-size", "4", "--max-length", "16"],
    "pretrain": lambda d: ["--model", d["model"], "--data", d["sft"], "--steps", "3",
                           "--batch-size", "4", "--max-length", "16", "--eval-samples", "0"],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_report_to_tensorboard_writes_every_metric_of_every_step(command, backend, data, tmp_path):
    out = tmp_path / "run"
    cli(command, "--backend", backend, *COMMANDS[command](data), "--out", out, "--no-progress",
        "--report-to", "tensorboard")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "tensorboard")
    counter = "iteration" if command == "train" else "step"
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        step = r[counter] + (1 if counter == "iteration" else 0)  # steps done when written
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                expected.setdefault(k, []).append((step, v))
    assert len(records) >= 2 and set(scalars) == set(expected)
    if command == "train":
        assert {"objective/kl", "objective/scores", "policy/clipfrac_avg", "loss/value_avg"} <= set(scalars)
    for k, want in expected.items():
        got = scalars[k]
        assert [s for s, _ in got] == [s for s, _ in want], k
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-6), k  # float32 in the event file


def test_report_to_none_writes_no_event_files(data, tmp_path):
    out = tmp_path / "run"
    cli("pretrain", "--backend", "torch", *COMMANDS["pretrain"](data), "--out", out, "--no-progress")
    assert not (out / "tensorboard").exists()
