"""Loading a checkpoint straight onto its shards (`load_pretrained(..., mesh=...)`,
`ppo_jax/models/loading.py`): on a data=2,fsdp=4 mesh of 8 simulated CPU devices every parameter
equals the host-loaded one, carries the trainers' parameter-rule sharding, and is read from the
safetensors file one device-shard at a time -- no read is ever a whole tensor unless the rule
replicates the parameter; with two processes, each reads only its own devices' shards. Runs in
subprocesses (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before jax is
imported), as `tests/test_parallel_jax.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=4"


def _worker(out: str, cases: list[tuple[str, str, str]]) -> None:
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    import ppo_jax.models as jm
    from ppo_jax.models.loading import hf_names
    from ppo_jax.models.lora import save_adapter
    from ppo_jax.models.stack import stacked_modules
    from ppo_jax.parallel import make_mesh, param_spec_at
    from ppo_rlhf import hf_checkpoint as hfc
    from ppo_rlhf.config import ModelOptions

    assert jax.device_count() == 8
    mesh = make_mesh(MESH)
    reads: list[tuple[str, tuple]] = []
    real_read = hfc.TensorSlices.read

    def recording_read(self, name, index):
        part = real_read(self, name, index)
        reads.append((name, tuple(part.shape)))
        return part

    def adapter_dir(base: str) -> str:
        """A PEFT adapter dir on `base` whose B is not zero (the adapters change the model);
        written once, before its loads are recorded."""
        path = Path(out).with_name("adapter")
        if path.is_dir():
            return str(path)
        lm = jm.load_pretrained(base, options=ModelOptions(lora_rank=4, lora_targets=("q", "v", "down")))
        rng = np.random.default_rng(0)
        for _, var in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam)):
            var[...] = rng.normal(size=var.shape).astype(np.float32)
        save_adapter(lm, path, base_model=base)
        return str(path)

    for _, kind, ckpt in cases:
        if kind == "adapter":
            adapter_dir(ckpt)
    hfc.TensorSlices.read = recording_read
    result = {}
    for label, kind, ckpt in cases:
        load = {"lm": jm.load_pretrained, "scalar": jm.load_scalar_model,
                "lora": lambda p, **kw: jm.load_pretrained(p, options=ModelOptions(
                    lora_rank=2, lora_targets=("q", "v")), **kw),
                "adapter": lambda p, **kw: jm.load_pretrained(adapter_dir(p), **kw),
                "value_head": lambda p, **kw: jm.load_pretrained(p, with_value_head=True, seed=3, **kw)}[kind]
        dtype = "bfloat16" if label.endswith("bf16") else "float32"
        host = load(ckpt, dtype=dtype)
        reads.clear()
        sharded = load(ckpt, dtype=dtype, mesh=mesh)
        host_flat = dict(nnx.to_flat_state(nnx.state(host)))
        model = sharded.lm if kind == "value_head" else sharded
        stacks = stacked_modules(model)
        r = {"params": 0, "split": 0, "unequal": [], "bad_sharding": [], "dtypes": [], "reads": len(reads),
             "bad_reads": [], "whole_reads_of_split": [], "unread": [], "adapters": 0, "adapters_zero": []}
        # and against the checkpoint itself, through the loader's inverse (model_tensors)
        stored = hfc.load_tensors(ckpt)
        r["unequal_to_file"] = [n for n, v in jm.model_tensors(sharded).items()
                                if not np.array_equal(np.asarray(v), stored[n].astype(v.dtype))]
        read_shapes: dict[str, set] = {}
        for name, shape in reads:
            read_shapes.setdefault(name, set()).add(shape)
        for path, var in nnx.to_flat_state(nnx.state(sharded)):
            arr, ref = var[...], host_flat[path][...]
            key = "/".join(map(str, path))
            r["params"] += 1
            if not np.array_equal(np.asarray(arr), np.asarray(ref)):
                r["unequal"].append(key)
            if arr.dtype != ref.dtype or arr.dtype != jax.numpy.dtype(dtype):
                r["dtypes"].append(f"{key}: {arr.dtype} vs {ref.dtype}, loaded as {dtype}")
            want = NamedSharding(mesh, param_spec_at(path, arr.shape, mesh))
            if not arr.sharding.is_equivalent_to(want, arr.ndim):
                r["bad_sharding"].append(f"{key}: {arr.sharding.spec} vs {want.spec}")
            shard = tuple(arr.sharding.shard_shape(arr.shape))
            r["split"] += shard != tuple(arr.shape)
            if isinstance(var, nnx.LoRAParam):
                r["adapters"] += 1
                if path[-1] == "lora_b" and not np.any(np.asarray(arr)):
                    r["adapters_zero"].append(key)
            if path[0] == "value_head" or isinstance(var, nnx.LoRAParam):  # not from the checkpoint
                continue
            names, transpose, stacked = hf_names(path[1:] if kind == "value_head" else path,
                                                 model.config.model_type, stacks)
            per = shard[1:] if stacked else shard  # what one read of one HF tensor must be
            per = per[::-1] if transpose else per
            full = tuple(arr.shape)[1:] if stacked else tuple(arr.shape)
            full = full[::-1] if transpose else full
            for name in names:
                got = read_shapes.get(name)
                if not got:
                    r["unread"].append(name)
                elif got != {per}:
                    r["bad_reads"].append(f"{name}: read {sorted(got)}, shard {per}")
                elif shard != tuple(arr.shape) and per == full:
                    r["whole_reads_of_split"].append(name)
        result[label] = r
    Path(out).write_text(json.dumps(result, indent=1))


def test_loading_onto_a_mesh_reads_only_shards_and_equals_the_host_load(tiny_checkpoint, tmp_path):
    """gpt2 and llama causal LMs (float32, gpt2 cast to bfloat16 slice by slice, llama with fresh
    LoRA adapters, llama from a PEFT adapter dir -- its base plus trained adapters), a llama
    scalar-head model and a qwen2 policy with a value head, loaded with mesh="data=2,fsdp=4":
    bit-equal to the host load, every array (adapters too) on the parameter rule's sharding
    (most of them split), and every slice read from the checkpoint exactly one device shard's
    size."""
    cases = [("gpt2", "lm", tiny_checkpoint("gpt2")), ("gpt2-bf16", "lm", tiny_checkpoint("gpt2")),
             ("llama", "lm", tiny_checkpoint("llama")), ("llama-lora", "lora", tiny_checkpoint("llama")),
             ("llama-peft-adapter", "adapter", tiny_checkpoint("llama")),
             ("llama-scalar", "scalar", tiny_checkpoint("llama", kind="scalar")),
             ("qwen2-value-head", "value_head", tiny_checkpoint("qwen2"))]
    out = tmp_path / "load.json"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "worker", str(out), json.dumps(cases, default=str)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    kinds = {label: kind for label, kind, _ in cases}
    for label, r in json.loads(out.read_text()).items():
        kind = kinds[label]
        assert r["params"] > 10 and r["reads"] > 0, (label, r)
        assert not r["unequal"], (label, r["unequal"])
        assert not r["unequal_to_file"], (label, r["unequal_to_file"])
        assert not r["dtypes"], (label, r["dtypes"])
        assert not r["bad_sharding"], (label, r["bad_sharding"])
        assert r["split"] >= r["params"] // 2, (label, r["split"], r["params"])
        assert not r["unread"], (label, r["unread"])
        assert not r["bad_reads"], (label, r["bad_reads"][:5])
        assert not r["whole_reads_of_split"], (label, r["whole_reads_of_split"][:5])
        assert (r["adapters"] > 0) == (kind in ("lora", "adapter")), (label, r["adapters"])
        if kind == "adapter":  # its B (not zero) was read; fresh adapters' B is zero
            assert r["adapters"] > 0 and not r["adapters_zero"], (label, r["adapters_zero"])


def _process_worker(ckpt: str, out: str) -> None:
    """One of two processes (4 CPU devices each) of a data=2,fsdp=4 mesh spanning both."""
    import jax

    from ppo_jax.parallel import initialize_distributed, make_mesh

    initialize_distributed()
    import numpy as np
    from flax import nnx

    import ppo_jax.models as jm
    from ppo_jax.models.loading import hf_names
    from ppo_jax.models.stack import stacked_modules
    from ppo_rlhf import hf_checkpoint as hfc

    reads: dict[str, int] = {}
    real_read = hfc.TensorSlices.read

    def counting_read(self, name, index):
        reads[name] = reads.get(name, 0) + 1
        return real_read(self, name, index)

    host = dict(nnx.to_flat_state(nnx.state(jm.load_pretrained(ckpt))))
    hfc.TensorSlices.read = counting_read
    model = jm.load_pretrained(ckpt, mesh=make_mesh(MESH))
    stacks = stacked_modules(model)
    r = {"arrays": 0, "global": 0, "unequal": [], "bad_counts": []}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        arr = var[...]
        r["arrays"] += 1
        r["global"] += not arr.is_fully_addressable
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), np.asarray(host[path][...])[shard.index]):
                r["unequal"].append("/".join(map(str, path)))
        for name in hf_names(path, model.config.model_type, stacks)[0]:  # one read per own device
            if reads.get(name) != len(arr.addressable_shards):
                r["bad_counts"].append(f"{name}: {reads.get(name)} reads, {len(arr.addressable_shards)} devices")
    Path(out).write_text(json.dumps(r))
    assert jax.process_count() == 2


def test_each_process_reads_only_its_own_devices_shards(tiny_checkpoint, tmp_path):
    """Two processes of 4 CPU devices, one data=2,fsdp=4 mesh across both (two hosts of a
    slice): every parameter is a global array, each process's shards equal the host load's
    slices, and each process reads one slice per tensor for each of ITS devices only."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    ckpt = tiny_checkpoint("llama")
    procs = [subprocess.Popen([sys.executable, __file__, "process", str(ckpt), str(tmp_path / f"{i}.json")],
                              env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-5000:]
    for i in range(2):
        r = json.loads((tmp_path / f"{i}.json").read_text())
        assert r["arrays"] > 10 and r["global"] == r["arrays"], (i, r)
        assert not r["unequal"], (i, r["unequal"])
        assert not r["bad_counts"], (i, r["bad_counts"][:5])


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2], json.loads(sys.argv[3]))
if __name__ == "__main__" and sys.argv[1:2] == ["process"]:
    _process_worker(sys.argv[2], sys.argv[3])
