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


def test_readme_lora_example_runs(tmp_path, monkeypatch):
    """The README's LoRA example (JAX; the torch twin is the same trainer API): the saved policy
    is a PEFT adapter pointing to its base."""
    import json

    from ppo_rlhf.hf_checkpoint import write_fresh_checkpoint
    from ppo_rlhf.tasks import reviews
    from ppo_rlhf.tokens import load_tokenizer

    monkeypatch.chdir(tmp_path)
    sft = tmp_path / "runs" / "demo-jax" / "sft"
    reviews.build_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    write_fresh_checkpoint(sft, reviews.demo_model_config("tiny", vocab_size=len(tok)), seed=0, tokenizer=tok)
    text = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "lora_rank=" in b)
    assert "num_iterations=20" in code
    namespace: dict = {}
    exec(compile(code.replace("num_iterations=20", "num_iterations=1"), "README.md", "exec"), namespace)
    assert len(namespace["history"]) == 1
    config = json.loads((tmp_path / "runs" / "my-ppo-lora" / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(sft.absolute())
