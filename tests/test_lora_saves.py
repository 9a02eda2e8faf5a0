"""LoRA models saved by `ppo-rlhf pretrain` / `train-rm` (both cores): PEFT adapter dirs that every
consumer loads. A reward model's adapter is peft's SEQ_CLS format -- the score head under peft's
name in `modules_to_save` -- plus our reward_normalisation.json; `peft` loads it onto the
transformers model with our scores. `--merge` writes the full merged checkpoint, computing what
the adapter dir computes; and the CLI chain pretrain -> train-rm -> train runs on adapter dirs."""

from __future__ import annotations

import importlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppo_jax.models as jm
import ppo_torch.models as tm
from ppo_jax.models import lora as jl
from ppo_rlhf import lora as lr
from ppo_rlhf.app.cli import main
from ppo_rlhf.config import ModelOptions
from ppo_rlhf.errors import CheckpointError
from ppo_torch.models import lora as tl

BACKENDS = ("jax", "torch")
LORA = ModelOptions(lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v", "up"))
IDS = np.array([[5, 9, 2, 7, 1, 3], [4, 4, 8, 6, 2, 6]])  # no padding: HF scores the last token
FULL = np.ones_like(IDS)


def _kit(backend):
    return (jm, jl) if backend == "jax" else (tm, tl)


def _values(model, ids=IDS, mask=FULL):
    """[B, T] reward_gain * head + reward_bias at every position (float32 numpy)."""
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model.values(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
    return np.asarray(model.values(jnp.asarray(ids), jnp.asarray(mask)))


def _logits(model, ids=IDS, mask=FULL):
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).numpy()
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _trained_reward_model(backend, base, *, gain=1.7, bias=-0.3):
    """A LoRA reward model on the causal LM `base`: nonzero adapters (drawn with numpy, loaded
    through a PEFT dir), a head of its own and a reward gain / bias, as a trainer leaves it."""
    models, lora = _kit(backend)
    model = models.scalar_model_from_lm(str(base), seed=5, options=LORA)
    rng = np.random.default_rng(0)
    tensors = {lr.PEFT_PREFIX + k: rng.normal(0, 0.3, v.shape).astype(np.float32)
               for k, v in lora.adapter_tensors(model).items()}
    model_type = json.loads((base / "config.json").read_text())["model_type"]
    adapter = lr.write_adapter(base.parent / f"start-{backend}", lr.peft_config(
        model_type=model_type, rank=LORA.lora_rank, alpha=LORA.lora_alpha, dropout=0.0,
        task_type="SEQ_CLS", modules=lr.lora_modules(model_type, LORA.lora_targets)), tensors)
    model = lora.load_adapter(model, adapter)
    if backend == "jax":
        head = model.score_head.kernel
        head[...] = jnp.asarray(rng.normal(0, 0.5, head.shape), head.dtype)
    else:
        with torch.no_grad():
            head = model.hf_model.score.weight
            head.copy_(torch.from_numpy(rng.normal(0, 0.5, tuple(head.shape))))
    model.reward_gain, model.reward_bias = gain, bias
    return model


# ---- the SEQ_CLS adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reward_model_adapter_round_trips_with_peft(tiny_checkpoint, tmp_path, backend, arch):
    """`save_adapter` of a LoRA reward model: peft's SEQ_CLS adapter (the head under peft's name,
    `modules_to_save`), which `PeftModel.from_pretrained(AutoModelForSequenceClassification...)`
    loads with our raw scores (float32 1e-4); `load_scalar_model(dir)` gives our scores back --
    merged by default, the adapters kept with LoRA options -- gain and bias included."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    models, lora = _kit(backend)
    base = tiny_checkpoint(arch)
    model = _trained_reward_model(backend, base)
    want = _values(model)
    out = lora.save_adapter(model, tmp_path / "rm", base_model=str(base))
    config = json.loads((out / lr.ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert not (out / "config.json").exists()
    saved = load_file(str(out / lr.ADAPTER_WEIGHTS))
    assert saved["base_model.model.score.weight"].shape == (1, model.config.hidden_size if backend == "jax"
                                                           else model.hf_model.config.hidden_size)

    hf = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    hf.config.pad_token_id = int(IDS.max()) + 1  # not in IDS: the last token is scored
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        raw = peft_model(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(FULL)).logits.numpy()
    np.testing.assert_allclose(1.7 * raw[:, 0] - 0.3, want[:, -1], rtol=0, atol=1e-4)

    merged = models.load_scalar_model(out)  # the default: a plain model, adapters merged
    assert not models.model_options(merged).lora
    assert (merged.reward_gain, merged.reward_bias) == (1.7, -0.3)
    np.testing.assert_allclose(_values(merged), want, rtol=0, atol=1e-4)
    kept = models.load_scalar_model(out, options=lr.adapter_options(out, base))  # GPT-2: q, k, v fused
    assert models.model_options(kept).lora
    np.testing.assert_allclose(_values(kept), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_adapter_dirs_are_one_line_errors(tiny_checkpoint, tmp_path, backend):
    """modules_to_save other than the score head, a causal LM's adapter loaded as a reward model
    and the other way round, an adapter saved into a full checkpoint's dir: one-line
    CheckpointErrors naming what is wrong."""
    models, lora = _kit(backend)
    base = tiny_checkpoint("llama")
    out = lora.save_adapter(_trained_reward_model(backend, base), tmp_path / "rm", base_model=str(base))
    config = json.loads((out / lr.ADAPTER_CONFIG).read_text())
    (out / lr.ADAPTER_CONFIG).write_text(json.dumps({**config, "modules_to_save": ["score", "lm_head"]}))
    with pytest.raises(CheckpointError, match=r"modules_to_save=\['score', 'lm_head'\]") as err:
        models.load_scalar_model(out)
    assert "\n" not in str(err.value)
    (out / lr.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="load it with load_scalar_model") as err:
        models.load_pretrained(out)
    assert "\n" not in str(err.value)
    lm = models.load_pretrained(base, options=LORA)
    causal = lora.save_adapter(lm, tmp_path / "lm", base_model=str(base))
    with pytest.raises(CheckpointError, match="a causal LM's adapter") as err:
        models.load_scalar_model(causal)
    assert "\n" not in str(err.value)
    # an adapter written over a full checkpoint would be read as the old model: refused, nothing written
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds a full checkpoint") as err:
        lora.save_adapter(lm, full, base_model=str(base))
    assert "\n" not in str(err.value) and sorted(p.name for p in full.iterdir()) == ["config.json"]


# ---- the CLI: pretrain -> train-rm -> train on adapter dirs -----------------------------------------
@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    from ppo_rlhf.data import write_records
    from ppo_rlhf.tasks import reviews

    d = tmp_path_factory.mktemp("prefs")
    write_records(d / "train.jsonl", reviews.preference_data(16, seed=0).records)
    return d


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=pytest.mark.slow), "torch"])  # jax: 20-40 s here
def test_cli_pretrain_and_train_rm_save_adapters_that_train_loads(tiny_checkpoint, prefs, tmp_path, capsys,
                                                                   backend):
    """`pretrain --lora-rank 2 --merge` and `train-rm --lora-rank 2 --merge` write PEFT adapter
    dirs (the tokenizer beside them) pointing to their --model, and OUT/merged full checkpoints
    computing the same logits / scores; `train --policy <pretrain out> --reward-model <train-rm
    out>` runs an iteration on them."""
    from tests.helpers import PROMPTS, SMALL

    models, lora = _kit(backend)
    base = tiny_checkpoint("gpt2")
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    data = tmp_path / "sft.txt"
    data.write_text("the quick brown fox\na good answer is short\nkind and true words\n")
    lora_args = ["--lora-rank", "2", "--lora-alpha", "4", "--merge", "--no-progress", "--backend", backend]
    assert main(["pretrain", "--model", str(base), "--data", str(data), "--out", str(sft), "--steps", "2",
                 "--batch-size", "2", "--max-length", "16", "--lr", "1e-2", "--eval-samples", "0",
                 *lora_args]) == 0
    assert main(["train-rm", "--model", str(base), "--data", str(prefs / "train.jsonl"), "--out", str(rm),
                 "--eval-fraction", "0", "--batch-size", "4", "--max-length", "48", "--lr", "1e-2",
                 *lora_args]) == 0
    for out in (sft, rm):
        config = json.loads((out / lr.ADAPTER_CONFIG).read_text())
        assert config["base_model_name_or_path"] == str(base.absolute())
        assert not (out / "config.json").exists() and (out / "tokenizer.json").exists()
        assert (out / "merged" / "config.json").exists() and (out / "merged" / "tokenizer.json").exists()
    assert json.loads((sft / lr.ADAPTER_CONFIG).read_text())["task_type"] == "CAUSAL_LM"
    assert (rm / lr.REWARD_NORMALISATION).exists()

    policy = models.load_pretrained(sft)  # adapters kept
    assert models.model_options(policy).lora
    assert np.abs(_logits(policy) - _logits(models.load_pretrained(base))).max() > 1e-6  # it trained
    np.testing.assert_allclose(_logits(models.load_pretrained(sft / "merged")), _logits(policy), rtol=0, atol=2e-5)
    np.testing.assert_allclose(_logits(models.load_pretrained(sft, options=ModelOptions())), _logits(policy),
                               rtol=0, atol=2e-5)
    reward, full = models.load_scalar_model(rm), models.load_scalar_model(rm / "merged")
    m = json.loads((rm / "metrics.json").read_text())
    assert (reward.reward_gain, reward.reward_bias) == (full.reward_gain, full.reward_bias) \
        == (pytest.approx(m["reward_gain"]), pytest.approx(m["reward_bias"]))
    assert reward.reward_gain != 1.0
    np.testing.assert_allclose(_values(reward), _values(full), rtol=0, atol=2e-5)
    kept = models.load_scalar_model(rm, options=lr.adapter_options(rm, base))
    assert models.model_options(kept).lora
    np.testing.assert_allclose(_values(kept), _values(full), rtol=0, atol=2e-5)

    rm_mod = importlib.import_module(f"ppo_{backend}.reward_model")  # train-rm --model <adapter dir>: merged
    start, start_full = (rm_mod.init_reward_model(str(d), seed=1) for d in (sft, sft / "merged"))
    assert not models.model_options(start).lora
    np.testing.assert_allclose(_values(start), _values(start_full), rtol=0, atol=2e-5)

    (tmp_path / "prompts.txt").write_text(PROMPTS)
    capsys.readouterr()
    assert main(["train", "--backend", backend, "--policy", str(sft), "--reward-model", str(rm),
                 "--prompts", str(tmp_path / "prompts.txt"), "--out", str(ppo), "--iterations", "1",
                 "--no-progress", *SMALL]) == 0
    assert (ppo / "policy" / "config.json").exists()  # trained in full: a full checkpoint
    assert main(["eval", "--backend", backend, "--policy", str(sft), "--reference", str(sft / "merged"),
                 "--reward-model", str(rm), "--prompts", str(tmp_path / "prompts.txt"), "--n", "4",
                 "--max-new-tokens", "4", "--max-prompt-len", "8", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert abs(result["kl_to_ref"]) < 1e-3, result  # the adapter dir and its merged checkpoint: one policy
    from ppo_rlhf.app.backends import load_policy_sampler

    assert len(load_policy_sampler(backend, sft, max_new_tokens=3).sample(["the quick"], 2)[0]) == 2
    capsys.readouterr()
    assert main(["train-rm", "--model", str(sft), "--data", str(prefs / "train.jsonl"), "--out",
                 str(tmp_path / "rm2"), "--backend", backend, "--lora-rank", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA adapter dir" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("case", ["fresh-model", "merge-alone", "ppo-merge-alone", "ppo-on-adapter",
                                  "sft-on-adapter"])
def test_cli_lora_save_errors_are_one_line(tiny_checkpoint, tmp_path, capsys, case):
    """LoRA with nothing on disk to be the adapter's base (a fresh model), --merge without LoRA
    (supervised and PPO: silently ignored before), and new adapters on an adapter dir (a chain of
    adapters): one-line errors, exit 2."""
    base = tiny_checkpoint("gpt2")
    adapter = tl.save_adapter(tm.load_pretrained(base, options=LORA), tmp_path / "adapter", base_model=str(base))
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    args, expect = {
        "fresh-model": (["pretrain", "--out", str(tmp_path / "o"), "--lora-rank", "2"], "--lora-rank needs --model"),
        "merge-alone": (["train-rm", "--model", str(base), "--data", "x", "--out", str(tmp_path / "o"), "--merge"],
                        "--merge writes the LoRA adapters merged into the base: it needs --lora-rank"),
        "ppo-merge-alone": (["train", "--policy", str(base), "--reward-fn", "tests.helpers:length_reward",
                             "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o"), "--merge"],
                            "--merge writes the policy's LoRA adapters merged into its base: it needs --lora-rank"),
        "ppo-on-adapter": (["train", "--policy", str(adapter), "--reward-fn", "tests.helpers:length_reward",
                            "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o"),
                            "--lora-rank", "2"], "is a LoRA adapter dir: new LoRA adapters need a full checkpoint"),
        "sft-on-adapter": (["pretrain", "--model", str(adapter), "--out", str(tmp_path / "o"), "--lora-rank", "2"],
                           f"pass its merged checkpoint ({adapter / 'merged'}"),
    }[case]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err
