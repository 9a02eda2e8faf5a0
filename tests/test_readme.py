"""The README's Python example runs as written, in both backends (with the iteration count cut
and the demo's pretrained policy replaced by an untrained one of the same architecture)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    block = next(b for b in blocks if "PPOTrainer(" in b and "trainer.train()" in b)
    return block


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_readme_python_example_runs(backend, tmp_path, monkeypatch):
    from ppo_rlhf.hf_checkpoint import write_fresh_checkpoint
    from ppo_rlhf.tasks import reviews
    from ppo_rlhf.tokens import load_tokenizer

    monkeypatch.chdir(tmp_path)
    sft = tmp_path / "runs" / f"demo-{backend}" / "sft"
    reviews.build_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    write_fresh_checkpoint(sft, reviews.demo_model_config("tiny", vocab_size=len(tok)), seed=0, tokenizer=tok)

    code = readme_python_block()
    assert "num_iterations=20" in code
    code = code.replace("num_iterations=20", "num_iterations=2")
    if backend == "torch":
        code = code.replace("from ppo_jax.ppo import PPOTrainer", "from ppo_torch.ppo import PPOTrainer")
        code = code.replace("runs/demo-jax/sft", "runs/demo-torch/sft")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["history"]
    assert len(history) == 2 and "objective/scores" in history[0]
    assert (tmp_path / "runs" / "my-ppo" / "policy" / "config.json").is_file()
    assert len((tmp_path / "runs" / "my-ppo" / "metrics.jsonl").read_text().splitlines()) == 2
