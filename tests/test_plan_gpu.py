"""`ppo-rlhf plan --topology h100[:N]`: a tiny model's whole PPO iteration compiled for H100s by
XLA's GPU compiler on this machine, which has no GPU (jax's CUDA plugin given the H100's target
description, `ppo_jax.gpu_targets`); the report checked against bounds from parameter counts and
against JAX's allocator share of the GPU's memory; bad GPU topologies are exit 2. And the CLI's
platform choice (`skip_absent_accelerators`): the CPU where no accelerator JAX can drive is present."""

from __future__ import annotations

import json

import pytest

from ppo_rlhf.app import backends
from ppo_rlhf.app.cli import main
from ppo_rlhf.errors import UsageError
from tests.test_plan import TINY, _write, qwen2_params

H100_BYTES = 84978434048  # 79.14 GiB visible to CUDA on an H100 SXM5 80 GB


def _needs_plugin():
    from ppo_jax.gpu_targets import plugin_library

    if plugin_library() is None:
        pytest.skip("--topology h100 needs jax's CUDA PJRT plugin (make setup installs it)")


@pytest.mark.parametrize("name,parsed", [("h100", ("h100", 1, 1)), ("H100:8", ("h100", 1, 8)),
                                         ("h100:2x8", ("h100", 2, 8))])
def test_parse_gpu_topology(name, parsed):
    from ppo_jax.gpu_targets import parse_gpu_topology

    assert parse_gpu_topology(name) == parsed


@pytest.mark.parametrize("name", ["h100:0", "h100:x8", "h100:8x", "h100:2x0", "h100:two"])
def test_parse_gpu_topology_rejects(name):
    from ppo_jax.gpu_targets import parse_gpu_topology

    with pytest.raises(UsageError, match="topology"):
        parse_gpu_topology(name)


def test_plan_tiny_ppo_iteration_h100(tmp_path, capsys, monkeypatch):
    _needs_plugin()
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    model = _write(tmp_path, "tiny", TINY)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(model), "--reward-model", str(model), "--topology", "h100:2",
               "--set", "batch_size=8", "--set", "max_prompt_len=16", "--set", "max_new_tokens=16",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    assert report["topology"] == "h100:2" and report["chips"] == 2 and report["fits"] is True
    assert report["hbm_bytes_per_chip"] == int(0.75 * H100_BYTES)  # JAX's default allocator share
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 of 79.14 GiB" in text
    progs = {p["name"]: p for p in report["programs"]}
    assert set(progs) == {"generate", "rollout_forward", "advantages", "update"}
    n_lm, n_rm = qwen2_params(TINY), qwen2_params(TINY, scalar=True)
    trained, frozen = 12 * (n_lm + n_rm), 4 * (n_lm + n_rm)  # as in the v5e test
    assert (trained + frozen) / 2 <= report["resident_state_bytes"] <= trained + frozen
    upd = progs["update"]
    assert upd["error"] is None and upd["argument_bytes"] >= trained / 2
    assert upd["alias_bytes"] >= trained / 2 and upd["temp_bytes"] > 0
    assert progs["generate"]["argument_bytes"] >= 4 * n_lm / 2
    coll = upd["collective_bytes"]  # fsdp over the two GPUs: gathered weights, reduced gradients
    assert coll.get("all-gather", 0) > 0 and coll.get("reduce-scatter", 0) + coll.get("all-reduce", 0) > 0


def test_plan_h100_allocator_share_and_too_large(tmp_path, capsys, monkeypatch):
    """The share of the GPU the verdict is checked against follows XLA_PYTHON_CLIENT_MEM_FRACTION,
    and a PPO batch over it is a clean "does not fit" (exit 1) that names the largest values and
    the switches that would help (a small share keeps the compile small: a tiny model)."""
    _needs_plugin()
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.01")  # 0.79 GiB usable
    model = _write(tmp_path, "wide", dict(TINY, vocab_size=1 << 16))
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(model), "--topology", "h100", "--set", "batch_size=256",
               "--set", "max_prompt_len=8", "--set", "max_new_tokens=8", "--set", "ppo_epochs=1",
               "--json", str(out)])
    text, err = capsys.readouterr()
    assert rc == 1, err
    report = json.loads(out.read_text())
    assert report["hbm_bytes_per_chip"] == int(0.01 * H100_BYTES)
    # 256 x 8 response tokens of float32 logits over 64K tokens: 0.5 GiB per copy, several held
    assert report["peak_bytes"] > report["hbm_bytes_per_chip"]
    assert "verdict: DOES NOT FIT" in text and "remat=full" in text and "Traceback" not in text + err
    # the peak program's largest values: float32 logits, 256 x 8 x 64K x 4 bytes = 0.5 GiB
    worst = max(report["programs"], key=lambda p: p["peak_bytes"])["name"]
    lines = text.splitlines()
    i = lines.index(f"largest values computed by {worst} (per chip; not all live at once):")
    size, shape = lines[i + 1].split()[:3:2]
    assert float(size) >= 0.5 and shape.startswith("f32["), lines[i + 1]


@pytest.mark.parametrize("topology,message", [("h100:0", "topology 'h100:0'"),
                                              ("h100:3x", "topology 'h100:3x'")])
def test_plan_bad_gpu_topology_is_exit_2(tmp_path, capsys, topology, message):
    model = _write(tmp_path, "tiny", TINY)
    assert main(["plan", "--model", str(model), "--topology", topology]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_plan_bad_mem_fraction_is_exit_2(tmp_path, capsys, monkeypatch):
    _needs_plugin()
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.5")
    model = _write(tmp_path, "tiny", TINY)
    assert main(["plan", "--model", str(model), "--topology", "h100"]) == 2
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in capsys.readouterr().err


@pytest.mark.parametrize("installed,tpu,gpu,expected", [
    ((), False, False, None),                                  # no plugin: nothing to keep out
    (("libtpu",), False, False, "cpu"),                        # libtpu, no TPU
    (("jax_cuda12_plugin",), False, False, "cpu"),             # CUDA plugin, no GPU: plan only
    (("libtpu", "jax_cuda12_plugin"), False, False, "cpu"),
    (("libtpu",), True, False, None),                          # a TPU VM
    (("libtpu", "jax_cuda12_plugin"), False, True, None),      # a GPU machine
    (("libtpu",), False, True, "cpu"),                         # a GPU but no plugin to drive it
    (("libtpu", "jax_rocm7_plugin"), False, False, None),      # AMD: JAX's own choice
])
def test_platform_choice(monkeypatch, installed, tpu, gpu, expected):
    import importlib.util

    from ppo_rlhf.runtime import processes

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object() if m in installed else None)
    monkeypatch.setattr(processes, "tpu_device_present", lambda: tpu)
    monkeypatch.setattr(processes, "gpu_device_present", lambda: gpu)
    backends.skip_absent_accelerators()
    import os

    assert os.environ.get("JAX_PLATFORMS") == expected
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # said by the user: kept
    backends.skip_absent_accelerators()
    assert os.environ["JAX_PLATFORMS"] == "tpu"
