"""LoRA: ppo_jax vs ppo_torch vs `transformers` + `peft`, with the same nonzero adapters.

The adapters are written by `peft` itself (`get_peft_model` with init_lora_weights=False: A and
B both random, so every adapter changes the logits) onto the tiny random checkpoints, loaded
into both cores (`load_adapter`), and each core's logits compared with `peft.PeftModel`'s. Then
each core writes its adapters back (`save_adapter`) and peft loads them onto the transformers
model. Tolerances are the model parity's (test_models_parity.py): float32 1e-4 absolute;
float64 1e-12 for GPT-2, 1e-5 for the rotary models (the rotary cos/sin are float32 in every
implementation and round differently by ~1 ulp; see test_float64 there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppo_jax.models as jm
import ppo_torch.models as tm
from parity_tests.test_models_parity import F32_ATOL, _batch, _full, _positions
from ppo_jax.models import lora as jl
from ppo_rlhf import lora as lr
from ppo_torch.models import lora as tl

TARGETS = {"gpt2": ("q", "o", "down"), "llama": ("q", "v", "o", "gate", "up", "down"),
           "qwen2": ("k", "v", "up"), "gpt_neox": ("q", "o", "up")}
RANK, ALPHA = 4, 6.0


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


def _peft_model(base, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()


def _peft_adapter(base, arch, out):
    """A PEFT adapter dir written by peft: random nonzero A and B on `TARGETS[arch]`."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    modules = lr.lora_modules(arch, TARGETS[arch])
    model = get_peft_model(_peft_model(base, torch.float32),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(modules),
                                      init_lora_weights=False, fan_in_fan_out=arch == "gpt2"))
    model.save_pretrained(str(out))
    return out


@torch.no_grad()
def _peft_logits(base, adapter, ids, mask, dtype=torch.float32):
    """transformers + peft.PeftModel: the independent reference, positions from the mask."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(_peft_model(base, dtype), str(adapter)).eval()
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(_positions(mask)).long())
    return out.logits.numpy()


def _jax_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@torch.no_grad()
def _torch_logits(model, ids, mask):
    return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).numpy()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_peft_adapter_in_and_out_float32(tiny_checkpoint, tmp_path, arch):
    base = tiny_checkpoint(arch)
    adapter = _peft_adapter(base, arch, tmp_path / "peft")
    ids, mask = _full(*_batch(seed=5))
    real = mask == 1
    ref = _peft_logits(base, adapter, ids, mask)
    plain = _peft_model(base, torch.float32)
    with torch.no_grad():
        base_ref = plain(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                         position_ids=torch.from_numpy(_positions(mask)).long()).logits.numpy()
    assert np.abs(ref[real] - base_ref[real]).max() > 0.1  # the adapters do change the logits

    j_opts = jl.adapter_options(adapter, base)
    t_opts = tl.adapter_options(adapter, base)
    assert j_opts == t_opts and j_opts.lora_rank == RANK and j_opts.lora_alpha == ALPHA
    assert set(lr.lora_modules(arch, j_opts.lora_targets)) == set(lr.lora_modules(arch, TARGETS[arch]))
    j = jl.load_adapter(jm.load_pretrained(base, options=j_opts), adapter)
    t = tl.load_adapter(tm.load_pretrained(base, options=t_opts), adapter)
    got_j, got_t = _jax_logits(j, ids, mask), _torch_logits(t, ids, mask)
    np.testing.assert_allclose(got_j[real], ref[real], atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(got_t[real], ref[real], atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(got_j[real], got_t[real], atol=F32_ATOL, rtol=0)

    # out: what each core writes, peft loads onto the transformers model with the same logits
    for name, save, model in (("jax", jl.save_adapter, j), ("torch", tl.save_adapter, t)):
        out = save(model, tmp_path / name, base_model=str(base))
        np.testing.assert_allclose(_peft_logits(base, out, ids, mask)[real], ref[real], atol=F32_ATOL,
                                   rtol=0, err_msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapters_float64(tiny_checkpoint, tmp_path, arch):
    """The same adapters in float64 models: JAX, torch and peft agree to the float64 model
    parity's tolerance."""
    base = tiny_checkpoint(arch)
    adapter = _peft_adapter(base, arch, tmp_path / "peft")
    ids, mask = _full(*_batch(seed=6))
    real = mask == 1
    tol = 1e-12 if arch == "gpt2" else 1e-5
    ref = _peft_logits(base, adapter, ids, mask, dtype=torch.float64)
    opts = jl.adapter_options(adapter, base)
    with jax.enable_x64(True):
        j = jl.load_adapter(jm.load_pretrained(base, dtype="float64", options=opts), adapter)
        got_j = _jax_logits(j, ids, mask)
        assert got_j.dtype == np.float64
    t = tl.load_adapter(tm.load_pretrained(base, dtype="float64", options=opts), adapter)
    got_t = _torch_logits(t, ids, mask)
    assert got_t.dtype == np.float64
    np.testing.assert_allclose(got_j[real], ref[real], atol=tol, rtol=0)
    np.testing.assert_allclose(got_t[real], ref[real], atol=tol, rtol=0)
    f32 = _peft_logits(base, adapter, ids, mask)
    assert np.abs(got_j[real] - f32[real]).max() > 1e-9  # really ran in float64


def test_scalar_model_adapters(tiny_checkpoint, tmp_path):
    """The critic / reward model with adapters (a fresh head from the same seed in both cores,
    the same nonzero adapters): the same values and scores, and with the adapters off, those of
    the model without LoRA."""
    from ppo_rlhf.config import ModelOptions
    base = tiny_checkpoint("llama")
    opts = ModelOptions(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=("q", "v", "down"))
    j = jm.scalar_model_from_lm(base, seed=11, options=opts)
    t = tm.scalar_model_from_lm(base, seed=11, options=opts)
    rng = np.random.default_rng(0)
    tensors = {lr.PEFT_PREFIX + k: rng.normal(0, 0.3, v.shape).astype(np.float32)
               for k, v in jl.adapter_tensors(j).items()}
    assert tensors.keys() == {lr.PEFT_PREFIX + k for k in tl.adapter_tensors(t)}
    adapter = lr.write_adapter(tmp_path / "a", lr.peft_config(
        model_type="llama", rank=RANK, alpha=ALPHA, dropout=0.0, task_type="SEQ_CLS",
        modules=lr.lora_modules("llama", opts.lora_targets)), tensors)
    j, t = jl.load_adapter(j, adapter), tl.load_adapter(t, adapter)
    q, qm, r, rm = _batch(seed=8)
    vj = np.asarray(jm.response_values(j, q, qm, r, rm))
    with torch.no_grad():
        tq = tuple(torch.from_numpy(x) for x in (q, qm, r, rm))
        vt = tm.response_values(t, *tq).numpy()
        with tl.adapters_disabled(t):
            vt_off = tm.response_values(t, *tq).numpy()
    with jl.adapters_disabled(j):
        vj_off = np.asarray(jm.response_values(j, q, qm, r, rm))
    plain = np.asarray(jm.response_values(jm.scalar_model_from_lm(base, seed=11), q, qm, r, rm))
    np.testing.assert_allclose(vj, vt, atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(vj_off, vt_off, atol=F32_ATOL, rtol=0)
    np.testing.assert_array_equal(vj_off, plain)
    assert np.abs(vj - plain).max() > 0.01  # the adapters change the values
