"""Host memory of loading a checkpoint onto a mesh: the whole model through host memory, then
sharded (the loader without a mesh + `Placement.params`, what a trainer did before) vs straight
onto its shards (`load_pretrained(path, mesh=...)`: each device's slice read alone).

    python -m benchmarks.sharded_load                       # qwen0.5b onto 8 simulated CPU devices, fsdp=8
    python -m benchmarks.sharded_load --shape tiny --mesh data=2,fsdp=4

Each path runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before jax is imported) and reports its peak resident set (`ru_maxrss`) after loading, the
resident set before loading (the interpreter, jax, XLA), and the model's float32 bytes. On CPU
the "devices" are host memory too: the sharded model itself is one model's bytes of the RSS, so
the expected peak above the baseline is ~2x the model (a whole host copy beside the shards)
before and ~1x after. The checkpoint is benchmarks/scale.py's (`make_checkpoints`, written once
under --cache).

Paths (--paths):
  host-dict  the loader as it was: every tensor read into a dict (`hf_checkpoint.load_tensors`),
             the model built from it on one device, then `Placement(mesh).params`
  host       today's loader without a mesh (tensors read one at a time), then `Placement.params`
  mesh       `load_pretrained(path, mesh=mesh)`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("host-dict", "host", "mesh")


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def _child(path_name: str, ckpt: str, mesh_spec: str) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from ppo_jax.models import CausalLM, ModelConfig, load_pretrained
    from ppo_jax.models.loading import _build
    from ppo_jax.parallel import Placement, make_mesh
    from ppo_rlhf import hf_checkpoint as hfc

    mesh = make_mesh(mesh_spec)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # the runtime up before the baseline
    base = _status_gib("VmRSS")
    t0 = time.perf_counter()
    if path_name == "mesh":
        model = load_pretrained(ckpt, mesh=mesh)
    else:
        if path_name == "host-dict":
            config = ModelConfig.from_hf(hfc.read_config(ckpt), dtype="float32")
            model = _build(lambda: CausalLM(config, rngs=nnx.Rngs(0)), hfc.load_tensors(ckpt), config,
                           where=ckpt)
        else:
            model = load_pretrained(ckpt)
        nnx.update(model, Placement(mesh).params(nnx.state(model)))
    arrays = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - t0
    split = sum(a.sharding.shard_shape(a.shape) != a.shape for a in arrays)
    devices = {d for a in arrays for d in a.sharding.device_set}
    return {"path": path_name, "mesh": mesh_spec, "devices": len(devices),
            "arrays": len(arrays), "split_arrays": int(split),
            "model_gib": sum(a.size * 4 for a in arrays) / 2**30,  # float32 bytes
            "base_rss_gib": base, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_after_gib": _status_gib("VmRSS"), "load_s": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", help="a benchmarks/scale.py shape (default qwen0.5b)")
    ap.add_argument("--cache", default="/tmp/ppo-rlhf-scale", help="where the checkpoint is (written once)")
    ap.add_argument("--mesh", default="fsdp=8")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=3, metavar=("PATH", "CKPT", "MESH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    from benchmarks.scale import make_checkpoints
    from ppo_rlhf.runtime.processes import parse_mesh

    policy, _ = make_checkpoints(args.shape, Path(args.cache))
    devices = parse_mesh(args.mesh).size
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    rows = []
    for name in args.paths.split(","):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.sharded_load", "--child", name, str(policy),
                               args.mesh], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{args.shape} onto {devices} simulated CPU devices, mesh {args.mesh}; model "
          f"{rows[0]['model_gib']:.2f} GiB in float32")
    print(f"{'path':10} {'peak RSS':>9} {'baseline':>9} {'peak - base':>12} {'x model':>8} "
          f"{'after':>7} {'split':>7} {'load s':>7}")
    for r in rows:
        above = r["peak_rss_gib"] - r["base_rss_gib"]
        print(f"{r['path']:10} {r['peak_rss_gib']:8.2f}G {r['base_rss_gib']:8.2f}G {above:11.2f}G "
              f"{above / r['model_gib']:7.2f}x {r['rss_after_gib']:6.2f}G {r['split_arrays']:>3}/{r['arrays']:<3} "
              f"{r['load_s']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "mesh": args.mesh, "rows": rows},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
