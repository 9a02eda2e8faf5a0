"""`ppo_rlhf.feedback.samplers.load_policy_sampler` (the labelling tool's `--policy`) with both backends, and
`ppo-rlhf label --policy DIR --backend {jax,torch}` driven through stdin on a tiny checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppo_rlhf.app.backends import load_policy_sampler
from ppo_rlhf.data import PairwiseRecord, read_records
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.samplers import ResponseSampler
from ppo_rlhf.testing import EOS_ID, EOS_TOKEN, PAD_TOKEN

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Please write a happy sentence about the sun."]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_policy_sampler(tiny_checkpoint, backend):
    path = tiny_checkpoint("gpt2")
    s = load_policy_sampler(backend, path, max_new_tokens=6, temperature=1.0, seed=3)
    assert isinstance(s, ResponseSampler) and s.eos_token_id == EOS_ID
    a = s.sample(PROMPTS, 3)
    b = s.sample(PROMPTS, 3)
    assert [len(r) for r in a] == [3, 3] and all(isinstance(x, str) for r in a for x in r)
    assert a != b  # the random state advanced
    assert len(set(a[0])) > 1  # k independent draws, not one repeated
    for p, rs in zip(PROMPTS, a):
        for r in rs:
            assert not r.startswith(p) and EOS_TOKEN not in r and PAD_TOKEN not in r
    again = load_policy_sampler(backend, path, max_new_tokens=6, temperature=1.0, seed=3)
    assert again.sample(PROMPTS, 3) == a  # reproducible from the seed
    assert s.sample([], 2) == []
    with pytest.raises(UsageError, match="k"):
        s.sample(PROMPTS, 0)


def test_policy_sampler_errors(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("gpt2")
    with pytest.raises(UsageError, match="unknown backend"):
        load_policy_sampler("numpy", path)
    with pytest.raises(UsageError, match="not a directory"):
        load_policy_sampler("torch", tmp_path / "missing")
    with pytest.raises(UsageError, match="max_new_tokens"):
        load_policy_sampler("torch", path, max_new_tokens=0)
    with pytest.raises(UsageError, match="temperature"):
        load_policy_sampler("torch", path, temperature=0.0)
    no_tok = tiny_checkpoint("gpt2", with_tokenizer=False)
    with pytest.raises(UsageError, match="tokenizer"):
        load_policy_sampler("torch", no_tok)
    only_tok = tmp_path / "only_tokenizer"
    only_tok.mkdir()
    for f in path.iterdir():
        if "token" in f.name:
            shutil.copy(f, only_tok / f.name)
    with pytest.raises(UsageError, match="cannot load a policy"):
        load_policy_sampler("torch", only_tok)
    # GPT-2 has 256 positions in the tiny config: prompt + 250 new tokens do not fit
    s = load_policy_sampler("torch", path, max_new_tokens=250)
    with pytest.raises(UsageError, match="positions"):
        s.sample(["a long prompt, long enough to pass the limit"], 1)


def test_policy_sampler_length_bucket_respects_positions(tiny_checkpoint):
    """A 5-token prompt is padded to a 16-token bucket, but never past n_positions - new tokens
    (the JAX GPT-2 refuses a cache longer than its 256 positions)."""
    s = load_policy_sampler("jax", tiny_checkpoint("gpt2"), max_new_tokens=246)
    (r,), = s.sample(["The quick brown fox"], 1)
    assert isinstance(r, str)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_label_with_policy(tiny_checkpoint, tmp_path, backend):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "labels.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "ppo_rlhf", "label", "--policy", str(tiny_checkpoint("gpt2")),
            "--backend", backend, "--prompts", str(prompts), "--out", str(out), "--k", "2",
            "--max-new-tokens", "6", "--seed", "1", "--no-shuffle"]
    r = subprocess.run(args, input="1\n2\n", capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("saved.") == 2, r.stdout
    records = list(read_records(out))
    assert [type(x) for x in records] == [PairwiseRecord, PairwiseRecord]
    assert [x.prompt for x in records] == PROMPTS
    assert all(isinstance(x.chosen, str) and isinstance(x.rejected, str) for x in records)
