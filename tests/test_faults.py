"""The fault suite (docs/reliability.md, which states each guarantee tested here).

1. Bad input: every CLI command answers a bad model dir, tokenizer, data file, flag or config
   value with one line on stderr, no traceback, exit code 2 (1 where it is not a usage error: a
   NaN reward); the Python API raises the documented exception.
2. Crashes: SIGKILL mid-iteration resumes exactly; SIGTERM / SIGINT checkpoint and exit 0; a
   corrupted newest checkpoint is named in a warning and the previous one is used (same metrics
   as an uninterrupted run); a checkpoint without its manifest is incomplete; when every
   checkpoint is corrupted the error says so; a crash while writing a checkpoint leaves the
   previous one (and LATEST) usable.
3. Numerical faults: non-finite updates are skipped and counted; N in a row stop training with
   a one-line message; the newest checkpoint then verifies and resuming from it works.

CLI runs are subprocesses (~3 s for an input error, ~10-15 s for a run with the JAX compile), on
tiny checkpoints built once per session (`tests.helpers.built_once`); runs of several minutes
are marked slow.
"""

from __future__ import annotations

import json
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from ppo_rlhf.errors import CheckpointError, UsageError
from ppo_rlhf.runtime.checkpoints import LATEST, MANIFEST, CheckpointManager, verify
from tests.helpers import (
    SMALL,
    assert_one_line_error,
    built_once,
    cli,
    copy_of,
    make_trainer,
    metrics,
    train,
    write_prompts,
)

BACKENDS = ["jax", "torch"]


# ---- inputs, built once per session -------------------------------------------------------------
def _build_inputs(d: Path) -> None:
    from ppo_rlhf.testing import make_tiny_checkpoint, make_tiny_tokenizer

    gpt2 = make_tiny_checkpoint(d / "gpt2", "gpt2")
    make_tiny_checkpoint(d / "rm", "gpt2", kind="scalar", seed=3)
    # a model of 300 tokens saved with a tokenizer of 512
    make_tiny_checkpoint(d / "small_vocab", "gpt2", vocab_size=300, with_tokenizer=False)
    make_tiny_tokenizer(d / "small_vocab", vocab_size=512)
    # reward models: another vocabulary size (no tokenizer files); the same size, another tokenizer
    make_tiny_checkpoint(d / "rm_vocab300", "gpt2", kind="scalar", vocab_size=300, with_tokenizer=False)
    make_tiny_checkpoint(d / "rm_other_tokenizer", "gpt2", kind="scalar", with_tokenizer=False)
    make_tiny_tokenizer(d / "rm_other_tokenizer", texts=["zebra xylophone quartz jumbo vex"] * 50)
    # an unsupported architecture; a damaged weights file (an interrupted download)
    shutil.copytree(gpt2, d / "bert")
    cfg = json.loads((d / "bert" / "config.json").read_text())
    (d / "bert" / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    shutil.copytree(gpt2, d / "damaged")
    weights = d / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # data files
    write_prompts(d)
    write_prompts(d, '{"prompt": "fine"}\n{"prompt": \n', "malformed.jsonl")
    write_prompts(d, "\n\n", "empty.txt")
    write_prompts(d, "the quick brown fox jumps over the lazy dog and the day is long\n"
                     "brown fox\na good answer\nis short\n", "long.txt")
    (d / "config.json").write_text("{batch_size: 4")
    (d / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a good answer",
                                                       "rejected": "bad"}) + "\n" for i in range(8)))
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "a good answer"})
                                         + "\n" for i in range(8)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "fault-inputs", _build_inputs)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, inputs):
    """reference_run(backend) -> an uninterrupted 4-iteration `ppo-rlhf train` run dir
    (checkpoint every iteration, the newest two kept: iter_3 and iter_4), built once."""
    def get(backend: str) -> Path:
        def build(d: Path) -> None:
            train(backend, inputs / "gpt2", inputs / "prompts.txt", d / "run", "--iterations", "4",
                  "--checkpoint-every", "1")

        return built_once(tmp_path_factory, f"reference-run-{backend}", build) / "run"

    return get


# ---- 1. bad input through the CLI: one line, no traceback, exit 2 (or 1) ----------------------------
@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Path, Path, str], list]  # (inputs, tmp_path, backend) -> arguments
    expected: tuple[str, ...]
    returncode: int = 2
    backends: tuple[str, ...] = ("jax",)  # the backends whose code this input reaches


def _train(i, out, b, *extra, policy="gpt2", prompts="prompts.txt",
           reward=("--reward-fn", "tests.helpers:length_reward")):
    return ["train", "--backend", b, "--policy", i / policy, *reward, "--prompts", i / prompts,
            "--out", out / "run", "--no-progress", *SMALL, "--iterations", "1", *extra]


def _eval(i, out, b, *extra, policy="gpt2", prompts="prompts.txt"):
    return ["eval", "--backend", b, "--policy", i / policy, "--prompts", i / prompts,
            "--max-new-tokens", "4", "--max-prompt-len", "8", *extra]


BOTH = ("jax", "torch")
TOKENIZER_TOO_BIG = "the tokenizer has 512 tokens but the model's vocabulary has 300"
DAMAGED = "model.safetensors' is unreadable or not a valid safetensors file"
CASES = [
    # a missing / unusable model dir
    Case("train-missing-policy", lambda i, o, b: _train(i, o, b, policy="nope"),
         ("ppo-rlhf train: error: --policy", "nope' is not a directory")),
    Case("train-damaged-weights", lambda i, o, b: _train(i, o, b, policy="damaged"), (DAMAGED,), backends=BOTH),
    Case("eval-missing-policy", lambda i, o, b: _eval(i, o, b, policy="nope"), ("is not a directory",)),
    Case("train-rm-damaged-weights", lambda i, o, b: ["train-rm", "--backend", b, "--model", i / "damaged",
         "--data", i / "prefs.jsonl", "--out", o / "rm", "--no-progress"], (DAMAGED,), backends=BOTH),
    Case("pretrain-damaged-weights", lambda i, o, b: ["pretrain", "--backend", b, "--model", i / "damaged",
         "--data", i / "sft.jsonl", "--out", o / "sft", "--steps", "1", "--eval-samples", "0",
         "--no-progress"], (DAMAGED,), backends=BOTH),
    # an unsupported architecture
    Case("train-unsupported-architecture", lambda i, o, b: _train(i, o, b, policy="bert"),
         ("unsupported model_type 'bert'", "supported model types: gpt2, llama, qwen2, gpt_neox"),
         backends=BOTH),
    # a tokenizer whose vocabulary does not fit the model
    Case("train-tokenizer-too-big", lambda i, o, b: _train(i, o, b, policy="small_vocab"),
         (TOKENIZER_TOO_BIG,), backends=BOTH),
    Case("eval-tokenizer-too-big", lambda i, o, b: _eval(i, o, b, policy="small_vocab"),
         (TOKENIZER_TOO_BIG,)),  # checked before a backend is imported
    Case("label-tokenizer-too-big", lambda i, o, b: ["label", "--backend", b, "--policy", i / "small_vocab",
         "--prompts", i / "prompts.txt", "--out", o / "labels.jsonl"], (TOKENIZER_TOO_BIG,), backends=BOTH),
    Case("train-rm-tokenizer-too-big", lambda i, o, b: ["train-rm", "--backend", b, "--model",
         i / "small_vocab", "--data", i / "prefs.jsonl", "--out", o / "rm", "--no-progress"],
         (TOKENIZER_TOO_BIG,), backends=BOTH),
    Case("pretrain-tokenizer-too-big", lambda i, o, b: ["pretrain", "--backend", b, "--model",
         i / "small_vocab", "--data", i / "sft.jsonl", "--out", o / "sft", "--steps", "1",
         "--eval-samples", "0", "--no-progress"], (TOKENIZER_TOO_BIG,), backends=BOTH),
    # sequences longer than GPT-2's learned positions (n_positions=256): refused before compiling
    Case("train-rm-max-length-past-positions", lambda i, o, b: ["train-rm", "--backend", b, "--model",
         i / "gpt2", "--data", i / "prefs.jsonl", "--out", o / "rm", "--max-length", "300", "--no-progress"],
         ("max_length = 300 exceeds the model's n_positions=256: lower it (--max-length",), backends=BOTH),
    Case("pretrain-max-length-past-positions", lambda i, o, b: ["pretrain", "--backend", b, "--model",
         i / "gpt2", "--data", i / "sft.jsonl", "--out", o / "sft", "--steps", "1", "--max-length", "300",
         "--eval-samples", "0", "--no-progress"], ("max_length = 300 exceeds the model's n_positions=256",),
         backends=BOTH),
    # policy and reward model with different tokenizers: refused (use a RewardFn instead)
    Case("train-reward-model-other-vocabulary", lambda i, o, b: _train(
         i, o, b, reward=("--reward-model", i / "rm_vocab300")),
         ("different vocabulary sizes (policy 512, reference 512, critic 300, reward model 300)",
          "wrap it in a RewardFn"), backends=BOTH),
    Case("train-reward-model-other-tokenizer", lambda i, o, b: _train(
         i, o, b, reward=("--reward-model", i / "rm_other_tokenizer")),
         ("the reward model", "has its own tokenizer, which differs from the policy's",
          "wrap it in a RewardFn that re-tokenises the decoded text"), backends=BOTH),
    Case("eval-reward-model-other-tokenizer", lambda i, o, b: _eval(
         i, o, b, "--reward-model", i / "rm_other_tokenizer"), ("has its own tokenizer",)),
    # malformed JSONL (file:line); an empty prompt file
    Case("train-malformed-prompts", lambda i, o, b: _train(i, o, b, prompts="malformed.jsonl"),
         ("malformed.jsonl:2: invalid JSON",)),
    Case("eval-malformed-prompts", lambda i, o, b: _eval(i, o, b, prompts="malformed.jsonl"),
         ("malformed.jsonl:2: invalid JSON",)),
    Case("label-malformed-prompts", lambda i, o, b: ["label", "--policy", i / "gpt2", "--prompts",
         i / "malformed.jsonl", "--out", o / "labels.jsonl"], ("malformed.jsonl:2: invalid JSON",)),
    Case("train-empty-prompts", lambda i, o, b: _train(i, o, b, prompts="empty.txt"),
         ("empty.txt: no prompts in the file",)),
    Case("eval-empty-prompts", lambda i, o, b: _eval(i, o, b, prompts="empty.txt"), ("no prompts",)),
    # invalid config values and flags
    Case("train-invalid-config-value", lambda i, o, b: _train(i, o, b, "--set", "kl_coef=-1"),
         ("PPOConfig.kl_coef=-1 is invalid: allowed a finite number in [0.0, inf)",)),
    Case("train-unknown-config-field", lambda i, o, b: _train(i, o, b, "--set", "kl_coeff=0.1"),
         ("PPOConfig: unknown field(s) ['kl_coeff']",)),
    Case("train-config-file-not-json", lambda i, o, b: _train(i, o, b, "--config", i / "config.json"),
         ("--config", "config.json': not valid JSON",)),
    Case("train-lora-negative-rank", lambda i, o, b: _train(i, o, b, "--lora-rank", "-1"),
         ("PPOConfig.lora_rank=-1 is invalid: allowed an integer >= 0",)),
    Case("train-lora-unknown-target", lambda i, o, b: _train(i, o, b, "--lora-rank", "2", "--lora-targets",
                                                             "q,query"),
         ("PPOConfig.lora_targets=('q', 'query') is invalid: allowed distinct names among q, k, v",)),
    Case("train-lora-target-not-in-the-model", lambda i, o, b: _train(i, o, b, "--lora-rank", "2",
                                                                      "--lora-targets", "q,gate"),
         ("--lora-targets: lora_targets ['gate'] do not exist in a gpt2 model",)),
    Case("train-lora-dropout-out-of-range", lambda i, o, b: _train(i, o, b, "--lora-rank", "2",
                                                                   "--lora-dropout", "1"),
         ("PPOConfig.lora_dropout=1.0 is invalid: allowed a number in [0, 1)",)),
    Case("train-lora-base-dtype-without-compute-dtype", lambda i, o, b: _train(
         i, o, b, "--lora-rank", "2", "--lora-base-dtype", "bfloat16"),
         ("PPOConfig.lora_base_dtype='bfloat16' needs compute_dtype='bfloat16' (got None)",)),
    Case("train-lora-on-a-critic-not-built", lambda i, o, b: _train(
         i, o, b, "--lora-rank", "2", "--lora-roles", "policy,critic", "--set", "advantage_estimator=grpo",
         "--set", "num_generations=2"), ("no 'critic' with advantage_estimator='grpo'",)),
    Case("train-negative-checkpoint-every", lambda i, o, b: _train(i, o, b, "--checkpoint-every", "-1"),
         ("--checkpoint-every -1: must be >= 0",)),
    Case("train-reward-fn-not-importable", lambda i, o, b: _train(
         i, o, b, reward=("--reward-fn", "no_such_module:fn")),
         ("cannot import module 'no_such_module'",)),
    Case("eval-zero-new-tokens", lambda i, o, b: _eval(i, o, b, "--max-new-tokens", "0"),
         ("max_new_tokens must be an integer >= 1, got 0",)),
    Case("eval-zero-temperature", lambda i, o, b: _eval(i, o, b, "--temperature", "0"),
         ("temperature must be a finite number > 0",)),
    Case("pretrain-negative-checkpoint-every", lambda i, o, b: ["pretrain", "--out", o / "sft",
         "--checkpoint-every", "-2"], ("--checkpoint-every -2: must be >= 0",)),
    Case("demo-invalid-kl-coef", lambda i, o, b: ["demo", "--quick", "--kl-coef", "-1", "--out", o / "demo"],
         ("PPOConfig.kl_coef=-1.0 is invalid",)),  # before minutes of pretraining
    Case("demo-out-is-a-file", lambda i, o, b: ["demo", "--quick", "--out", i / "prompts.txt"],
         ("exists and is not a directory",)),
    # a mesh that doesn't match the devices (this process: one CPU device)
    Case("train-mesh-too-big", lambda i, o, b: _train(i, o, b, "--mesh", "data=2,fsdp=2",
                                                                   "--set", "batch_size=8"),
         ("mesh data=2,fsdp=2 needs data x fsdp x tensor = 2 x 2 x 1 = 4 devices, but there are "
          "1 CPU devices",)),
    Case("train-mesh-batch-indivisible", lambda i, o, b: _train(i, o, b, "--mesh", "data=3"),
         ("batch_size=4 cannot be split over 3 data-parallel workers",)),
    Case("train-mesh-unknown-axis", lambda i, o, b: _train(i, o, b, "--mesh", "data=2,pipeline=2"),
         ("unknown axis 'pipeline'",)),
    Case("train-mesh-with-torch", lambda i, o, b: _train(i, o, b, "--mesh", "data=2"),
         ("--mesh and --multihost are for --backend jax",), backends=("torch",)),
    # NaN / inf scores from a reward function: refused, exit 1 (not a usage error)
    Case("train-nan-reward", lambda i, o, b: _train(
         i, o, b, reward=("--reward-fn", "tests.helpers:nan_reward")),
         ("NonFiniteRewardError: reward function 'nan_reward' returned non-finite scores (nan) for "
          "1 of 4 samples (first: sample 0); refusing to train on them",), returncode=1, backends=BOTH),
]


@pytest.mark.parametrize("case,backend", [pytest.param(c, b, id=f"{c.name}-{b}")
                                          for c in CASES for b in c.backends])
def test_cli_bad_input(case, backend, inputs, tmp_path):
    proc = cli(*case.argv(inputs, tmp_path, backend), check=False)
    assert_one_line_error(proc, case.returncode, *case.expected)


def test_cli_debug_shows_the_traceback(inputs, tmp_path):
    proc = cli("--debug", *_train(inputs, tmp_path, "jax", prompts="malformed.jsonl"), check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "DataError" in proc.stderr and "malformed.jsonl:2: invalid JSON" in proc.stderr


def test_cli_long_prompt_is_truncated_from_the_left_with_a_warning(inputs, tmp_path):
    proc = cli(*_train(inputs, tmp_path, "torch", prompts="long.txt"))
    assert ("ppo-rlhf train: warning: 1 of 4 prompts are longer than max_prompt_len=8 tokens and "
            "were truncated from the left\n") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 1. bad input through the Python API ----------------------------------------------------------
def test_tokenize_prompts_keeps_the_end_of_a_long_prompt(inputs):
    from ppo_rlhf.tokens import load_tokenizer, tokenize_prompts

    tok = load_tokenizer(inputs / "gpt2")
    long = "one two three four five six seven eight nine ten"
    full = tok(long, add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than max_prompt_len=4 tokens "
                                         r"and were truncated from the left"):
        ids, mask, truncated = tokenize_prompts(tok, [long, "hi"], 4)
    assert truncated == 1 and ids[0].tolist() == full[-4:] and mask[0].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_model_errors(backend, inputs):
    """The loaders raise CheckpointError (a UsageError) naming the problem, in both backends;
    the torch loader is as strict as the JAX one (no silently re-initialised tensors)."""
    if backend == "jax":
        from ppo_jax.models import load_pretrained, load_scalar_model
    else:
        from ppo_torch.models import load_pretrained, load_scalar_model
    with pytest.raises(CheckpointError, match="is unreadable or not a valid safetensors file"):
        load_pretrained(inputs / "damaged")
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_pretrained(inputs / "bert")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_scalar_model(inputs / "nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_tensors_that_do_not_fit_the_config(backend, inputs, tmp_path):
    if backend == "jax":
        from ppo_jax.models import load_pretrained
    else:
        from ppo_torch.models import load_pretrained
    for key, value, message in [("n_layer", 3, r"missing tensor\(s\) \['transformer.h.2."),
                                ("n_embd", 128, r"tensor 'transformer\..*' has shape \(.*\), the model expects")]:
        d = copy_of(inputs / "gpt2", tmp_path / key)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(d)


def test_api_unreadable_config_is_a_checkpoint_error(inputs, monkeypatch):
    from ppo_rlhf import hf_checkpoint

    real = Path.read_text

    def read_text(self, *a, **kw):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(CheckpointError, match="cannot read .*config.json.*: Permission denied"):
        hf_checkpoint.read_config(inputs / "gpt2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_trainer_refuses_models_and_tokenizers_that_do_not_belong_together(backend, inputs):
    with pytest.raises(UsageError, match=TOKENIZER_TOO_BIG):
        make_trainer(backend, inputs / "small_vocab")
    with pytest.raises(UsageError, match=r"the reward model .* has its own tokenizer, which differs "
                                         r"from the policy's \(\d+ of 512 token ids"):
        make_trainer(backend, inputs / "gpt2", reward=str(inputs / "rm_other_tokenizer"))
    with pytest.raises(UsageError, match=r"different vocabulary sizes \(policy 512, reference 512, "
                                         r"critic 300, reward model 300\)"):
        make_trainer(backend, inputs / "gpt2", reward=str(inputs / "rm_vocab300"))
    with pytest.raises(UsageError, match="checkpoint_every must be an integer >= 0"):
        make_trainer(backend, inputs / "gpt2", checkpoint_every=-1)


def test_api_a_reward_model_with_the_policys_tokenizer_is_accepted(inputs):
    """The tokenizer check compares what the ids mean, not the files: the reward model's own
    copy of the policy's tokenizer is fine."""
    t = make_trainer("torch", inputs / "gpt2", reward=str(inputs / "rm"))
    assert t.reward_model() is not None


def test_api_evaluate_bad_arguments(inputs):
    from ppo_rlhf.app.evaluate import evaluate

    for kw, message in [(dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
                        (dict(batch_size=-1), "batch_size must be an integer >= 1"),
                        (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
                        (dict(reward_model=str(inputs / "nope")), "reward model dir .* does not exist"),
                        (dict(reference=str(inputs / "small_vocab")), r"different vocabulary sizes "
                                                                      r"\(policy 512, reference 300\)")]:
        with pytest.raises(UsageError, match=message):
            evaluate("jax", inputs / "gpt2", ["a b"], **kw)


def test_api_nan_reward_is_refused():
    from ppo_rlhf.rewards import NonFiniteRewardError, ScoreRequest, TextRewardModel

    z = np.zeros((2, 3), np.int32)
    req = ScoreRequest(z, z, z, z, prompts=["a", "b"], responses=["c", "d"])
    with pytest.raises(NonFiniteRewardError, match=r"returned non-finite scores \(inf\) for 1 of 2 "
                                                   r"samples \(first: sample 1\)"):
        TextRewardModel(lambda p, r: [0.0, float("inf")], name="f").score(req)


def test_torch_loading_prints_nothing_and_restores_transformers_settings(inputs, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from ppo_torch.models import load_pretrained, save_pretrained

    hf_logging.enable_progress_bar()
    before = hf_logging.get_verbosity()
    capfd.readouterr()
    save_pretrained(load_pretrained(inputs / "gpt2"), tmp_path / "copy")
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), err  # no "Loading weights" / "Writing model shards" bars
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == before


# ---- 2. crashes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_iteration_then_resume_is_exact(backend, inputs, reference_run, tmp_path):
    ref = metrics(reference_run(backend))
    assert [r["iteration"] for r in ref] == [0, 1, 2, 3]
    ckpt, prompts, run = inputs / "gpt2", inputs / "prompts.txt", tmp_path / "killed"
    # killed by SIGKILL inside iteration 2's reward computation (the 3rd reward call)
    proc = train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1",
                 env={"PPO_TEST_KILL_AT": "3"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert [r["iteration"] for r in metrics(run)] == [0, 1]
    assert (run / "checkpoints" / LATEST).read_text().strip() == "iter_00000002"
    # a new run refuses to overwrite it ...
    proc = train(backend, ckpt, prompts, run, "--iterations", "4", check=False)
    assert_one_line_error(proc, 2, "already holds checkpoints: pass --resume")
    # ... --resume continues and reproduces the uninterrupted run exactly
    train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1", "--resume")
    assert metrics(run) == ref


# Each signal once, each backend once: the handler is the shared host loop's (the other pairs
# ran the same code and cost CI a minute on the slower machine: issue 13)
@pytest.mark.parametrize("backend,sig", [("jax", "TERM"), ("torch", "INT")])
def test_sigterm_and_sigint_checkpoint_and_exit_cleanly(backend, sig, inputs, reference_run, tmp_path):
    ckpt, prompts, run = inputs / "gpt2", inputs / "prompts.txt", tmp_path / "run"
    proc = train(backend, ckpt, prompts, run, "--iterations", "5", "--checkpoint-every", "0",
                 env={"PPO_TEST_KILL_AT": "2", "PPO_TEST_SIGNAL": sig}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"SIG{sig}: stopped after iteration 2; checkpoint written, resume with --resume" in proc.stderr
    assert (run / "checkpoints" / LATEST).read_text().strip() == "iter_00000002"
    assert verify(run / "checkpoints" / "iter_00000002")["iteration"] == 2
    train(backend, ckpt, prompts, run, "--iterations", "3", "--resume")
    assert metrics(run) == metrics(reference_run(backend))[:3]


# The reward-model and SFT trainers run through the same host loop as PPO: SIGTERM / SIGINT
# checkpoint and exit 0, --resume continues and reproduces the uninterrupted run's metrics.
SUPERVISED = {
    "train-rm": ("--model", "gpt2", "--data", "prefs.jsonl", "--epochs", "3", "--batch-size", "2",
                 "--max-length", "16", "--eval-fraction", "0.25"),
    "pretrain": ("--model", "gpt2", "--data", "sft.jsonl", "--steps", "6", "--batch-size", "2",
                 "--max-length", "16", "--eval-samples", "0"),
}


def _supervised(command: str, backend: str, inputs: Path, out: Path, *extra: str,
                signal_at: int | None = None, sig: str = "TERM"):
    from tests.helpers import run_module

    args = [a if a not in ("gpt2", "prefs.jsonl", "sft.jsonl") else inputs / a for a in SUPERVISED[command]]
    argv = [command, "--backend", backend, *args, "--out", out, "--no-progress", *extra]
    if signal_at is None:
        return cli(*argv)
    return run_module("tests.signal_at", *argv, check=False,
                      env={"PPO_TEST_SIGNAL_AT_RECORD": str(signal_at), "PPO_TEST_SIGNAL": sig})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("command,sig", [("train-rm", "TERM"), ("pretrain", "INT")])
def test_supervised_sigterm_checkpoints_and_resume_repeats_the_uninterrupted_run(
        command, sig, backend, inputs, tmp_path):
    _supervised(command, backend, inputs, tmp_path / "ref")
    proc = _supervised(command, backend, inputs, tmp_path / "run", signal_at=3, sig=sig)
    assert proc.returncode == 0, proc.stderr
    assert f"SIG{sig}: stopped after step 3; checkpoint written, resume with --resume" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / LATEST).read_text().strip() == "iter_00000003"
    assert verify(tmp_path / "run" / "checkpoints" / "iter_00000003")["step"] == 3
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing finalised
    _supervised(command, backend, inputs, tmp_path / "run", "--resume")
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    final = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run")]
    for m in final:
        m.pop("time_s"), m.pop("step_time_s", None)
    assert final[0] == final[1]


def _flip_bytes(checkpoint: Path) -> Path:
    """Flip 16 bytes in the middle of the biggest file of the checkpoint's state/ (its weights)."""
    target = max((p for p in (checkpoint / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(backend, inputs, reference_run,
                                                                   tmp_path):
    run = copy_of(reference_run(backend), tmp_path / "run")
    newest = run / "checkpoints" / "iter_00000004"
    damaged = _flip_bytes(newest)
    proc = train(backend, inputs / "gpt2", inputs / "prompts.txt", run, "--iterations", "4",
                 "--checkpoint-every", "1", "--resume")
    rel = damaged.relative_to(newest)
    assert (f"ppo-rlhf train: warning: checkpoint {newest} is corrupted ({newest}: file {rel} does "
            f"not match its checksum); trying the previous one\n") in proc.stderr, proc.stderr
    # iteration 3 was redone from iter_3: the same metrics as the uninterrupted run
    assert metrics(run) == metrics(reference_run(backend))
    assert verify(newest)["iteration"] == 4  # rewritten


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_without_manifest_is_treated_as_incomplete(backend, reference_run, tmp_path):
    root = copy_of(reference_run(backend) / "checkpoints", tmp_path / "checkpoints")
    (root / "iter_00000004" / MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"iter_00000004 is corrupted \(.*: no MANIFEST.json \(the "
                                         r"checkpoint was never completed\)\); trying the previous one"):
        path, state = CheckpointManager(root).latest()
    assert path.name == "iter_00000003" and state["iteration"] == 3 and state["backend"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_checkpoint_corrupted_is_a_clear_error(backend, inputs, reference_run, tmp_path):
    run = copy_of(reference_run(backend), tmp_path / "run")
    _flip_bytes(run / "checkpoints" / "iter_00000004")
    (run / "checkpoints" / "iter_00000003" / MANIFEST).unlink()
    proc = train(backend, inputs / "gpt2", inputs / "prompts.txt", run, "--iterations", "5",
                 "--resume", check=False)
    warning_lines = [l for l in proc.stderr.splitlines() if ": warning: checkpoint " in l]
    assert len(warning_lines) == 2, proc.stderr
    proc.stderr = "".join(l + "\n" for l in proc.stderr.splitlines() if l not in warning_lines)
    # a damaged run directory is the user's to fix (another --out): a usage error, exit code 2
    assert_one_line_error(proc, 2, f"error: every checkpoint under {run / 'checkpoints'} "
                                   f"is corrupted (iter_00000004, iter_00000003)",
                          "pass another --out to start afresh")
    with pytest.raises(CheckpointError, match="every checkpoint under"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CheckpointManager(run / "checkpoints").latest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(backend, inputs, tmp_path):
    """The backend's save raises after writing some files (the trainer state, not yet the HF
    policy): LATEST still names the previous checkpoint, which verifies; a new trainer resumes
    from it and repeats the crashed run's iteration exactly; the debris goes at the next save."""
    out = tmp_path / "run"
    t = make_trainer(backend, inputs / "gpt2", out_dir=out, checkpoint_every=1)
    t.train(2, progress=False)
    root = out / "checkpoints"
    assert (root / LATEST).read_text() == "iter_00000002\n"

    def crash(path):
        raise OSError(28, "No space left on device (simulated)")

    t.save_policy = crash  # called by save_checkpoint after the optimiser state is written
    with pytest.raises(OSError, match="simulated"):
        t.train(3, progress=False)
    assert (root / LATEST).read_text() == "iter_00000002\n"
    debris = list(root.glob(".tmp-iter_00000003-*"))
    assert len(debris) == 1 and (debris[0] / "state").is_dir()
    assert not (root / "iter_00000003").exists()
    path, state = CheckpointManager(root).latest()
    assert path.name == "iter_00000002" and state["iteration"] == 2

    again = make_trainer(backend, inputs / "gpt2", out_dir=out, checkpoint_every=1)
    history = again.train(3, resume=True, progress=False)
    assert len(history) == 1 and history[0]["iteration"] == 2
    drop = lambda s: {k: v for k, v in s.items() if not k.startswith("time/")}
    assert drop(history[0]) == drop(t.history[2])
    assert (root / LATEST).read_text() == "iter_00000003\n" and not list(root.glob(".tmp-*"))


# ---- 3. numerical faults ----------------------------------------------------------------------------
def _poison(trainer):
    """Put a NaN into one policy weight."""
    if trainer.backend == "jax":
        import jax

        leaves, treedef = jax.tree.flatten(trainer.params["policy"])
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(float("nan"))
        trainer.params["policy"] = jax.tree.unflatten(treedef, leaves)
    else:
        import torch

        with torch.no_grad():
            next(trainer.policy.parameters()).view(-1)[0] = float("nan")


def _flat(t) -> np.ndarray:
    if t.backend == "jax":
        import jax

        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t.params)])
    return np.concatenate([p.detach().numpy().ravel() for p in t._trainable()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_updates_are_skipped_then_training_stops(backend, inputs):
    from ppo_rlhf.errors import NonFiniteUpdates
    from ppo_rlhf.tokens import tokenize_prompts

    t = make_trainer(backend, inputs / "gpt2", max_bad_updates=6)
    t.step()
    q, qm, _ = tokenize_prompts(t.tokenizer, ["a b", "c d e", "f", "g h"], t.config.max_prompt_len)
    batch = t.rollout(q, qm, iteration=1)
    adv = t.compute_advantages({k: v for k, v in batch.arrays().items() if not k.startswith("extra/")}, 0.05)
    before = _flat(t)
    # a NaN advantage on a real token of every row makes every minibatch's loss NaN: all
    # 2 epochs x 2 minibatches are skipped
    adv = {k: np.array(t._to_numpy(v)) for k, v in adv.items()}
    adv["advantages"][:, 0] = np.nan
    stats = t.update({**batch.arrays(), **adv}, iteration=1)
    assert np.asarray(stats["update/skipped"]).all()
    np.testing.assert_array_equal(_flat(t), before)  # params (and optimiser) untouched
    assert t.loop.bad_updates.total == 0  # update() alone does not count; step() does (below)
    # poisoned weights: iterations keep skipping until max_bad_updates in a row stop training
    _poison(t)
    with pytest.raises(NonFiniteUpdates, match="6 consecutive optimiser updates had a non-finite loss"):
        for _ in range(4):
            t.step()
    assert t.loop.bad_updates.consecutive == 6 and t.loop.bad_updates.total == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stop_keeps_the_last_checkpoint_and_resume_works(backend, inputs, reference_run, tmp_path):
    """From iteration 2 on, every update is non-finite (a reward of 3e38 overflows the value loss):
    its 4 updates are skipped and max_bad_updates=4 stops the run with one line, exit 1. The
    newest checkpoint (after iteration 1) verifies, and resuming from it with a sane reward
    repeats the uninterrupted run exactly."""
    ckpt, prompts, run = inputs / "gpt2", inputs / "prompts.txt", tmp_path / "run"
    proc = train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1",
                 "--set", "max_bad_updates=4", env={"PPO_TEST_HUGE_FROM": "3"}, check=False)
    assert_one_line_error(proc, 1, "NonFiniteUpdates: iteration 2: 4 consecutive optimiser updates had a "
                                   "non-finite loss or gradient (NaN/inf); stopping",
                          "continue with --resume")
    assert [r["iteration"] for r in metrics(run)] == [0, 1]
    assert (run / "checkpoints" / LATEST).read_text().strip() == "iter_00000002"
    state = verify(run / "checkpoints" / "iter_00000002")
    assert state["iteration"] == 2 and state["bad_updates_consecutive"] == 0
    train(backend, ckpt, prompts, run, "--iterations", "4", "--checkpoint-every", "1",
          "--set", "max_bad_updates=4", "--resume")
    assert metrics(run) == metrics(reference_run(backend))


def test_cli_train_with_lora_writes_the_peft_adapter(inputs, tmp_path):
    """`--set lora_rank=R` (or --lora-rank R) with --lora-alpha / --lora-targets: OUT/policy is a
    PEFT adapter whose adapter_config.json names --policy as its base."""
    run = tmp_path / "run"
    train("torch", inputs / "gpt2", inputs / "prompts.txt", run, "--iterations", "1",
          "--set", "lora_rank=2", "--lora-alpha", "4", "--lora-targets", "q,o", "--merge")
    config = json.loads((run / "policy" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj"]
    assert config["base_model_name_or_path"] == str((inputs / "gpt2").absolute())
    assert (run / "policy" / "adapter_model.safetensors").is_file()
    assert not (run / "policy" / "model.safetensors").exists()
    assert (run / "policy-merged" / "model.safetensors").is_file()  # --merge: a full checkpoint
    cli(*_eval(inputs, tmp_path, "torch", policy=run / "policy"))  # an adapter dir loads as a policy
