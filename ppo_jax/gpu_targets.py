"""Compile-only NVIDIA GPUs for `ppo-rlhf plan --topology h100[:N]`: XLA's GPU compiler runs on a
machine with no GPU when it is given the target's description (a `GpuTargetConfigProto`, text
format) instead of a device to query. jax's CUDA PJRT plugin (`jax-cuda12-pjrt`, at jax's
version; no CUDA libraries are needed to compile) accepts it as the `target_config` of a PJRT
topology, and the devices it returns compile as a real H100 would (the same passes, the same
buffer assignment; `Compiled.memory_analysis()` per GPU).

    devices, usable = gpu_topology_devices("h100:8")   # 8 H100s in one host

Where the plugin comes from (`plugin_library`): a plugin JAX already loaded (a GPU install), else
`$PPO_RLHF_CUDA_PJRT` (the path of its `xla_cuda_plugin.so`), else `<venv>/gpu-plan`, where
`make setup` installs it (`pip install --no-deps --target <venv>/gpu-plan jax-cuda12-pjrt==<jax's
version>`): out of JAX's plugin discovery, so that not every JAX process loads 0.5 GB of GPU
compiler, only a plan for a GPU (`load_pjrt_plugin_dynamically`, once).

Usable memory: JAX's GPU allocator takes at most `XLA_PYTHON_CLIENT_MEM_FRACTION` (default 0.75)
of a GPU's memory, preallocated or not; the plan checks the programs against that share, as a
real run would be limited (set the variable here to plan for another fraction).
"""

from __future__ import annotations

import os
import re
from typing import Any

from ppo_rlhf.errors import UsageError

# NVIDIA H100 SXM5 80 GB (HBM3), the hardware figures XLA's cost model and tiling read:
# 132 SMs, compute capability 9.0, 50 MiB L2, 3.35 TB/s, 1.98 GHz boost clock, 228 KiB shared
# memory per SM (227 KiB per block opt-in), 79.14 GiB visible to CUDA.
H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

GPU_TARGETS = {"h100": H100_SXM}
DEFAULT_MEM_FRACTION = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION


def is_gpu_topology(name: str) -> bool:
    return name.split(":", 1)[0].lower() in GPU_TARGETS


def device_memory_bytes(target: str) -> int:
    m = re.search(r"device_memory_size:\s*(\d+)", GPU_TARGETS[target])
    assert m, target
    return int(m.group(1))


def mem_fraction() -> float:
    """The share of each GPU's memory JAX's allocator may use (`XLA_PYTHON_CLIENT_MEM_FRACTION`)."""
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        f = float(raw) if raw else DEFAULT_MEM_FRACTION
    except ValueError:
        raise UsageError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number") from None
    if not 0.0 < f <= 1.0:
        raise UsageError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} must be in (0, 1]")
    return f


def parse_gpu_topology(name: str) -> tuple[str, int, int]:
    """"h100" -> ("h100", 1 host, 1 GPU); "h100:8" -> 8 GPUs in one host; "h100:2x8" -> 2 hosts of
    8. UsageError for anything else."""
    target, _, shape = name.lower().partition(":")
    if target not in GPU_TARGETS:
        raise UsageError(f"unknown GPU {target!r}: {', '.join(GPU_TARGETS)}")
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape or "1")
    if not m or int(m.group(2)) < 1 or (m.group(1) is not None and int(m.group(1)) < 1):
        raise UsageError(f"topology {name!r}: write {target}, {target}:N (N GPUs in one host) or "
                         f"{target}:HxN (H hosts of N)")
    return target, int(m.group(1) or 1), int(m.group(2))


def plugin_library() -> str | None:
    """The path of jax's CUDA PJRT plugin library (see the module docstring), or None."""
    import importlib.util
    import sys
    from pathlib import Path

    env = os.environ.get("PPO_RLHF_CUDA_PJRT")
    if env:
        if not Path(env).is_file():
            raise UsageError(f"PPO_RLHF_CUDA_PJRT={env!r}: no such file (jax's xla_cuda_plugin.so)")
        return env
    so = Path(sys.prefix) / "gpu-plan" / "jax_plugins" / "xla_cuda12" / "xla_cuda_plugin.so"
    if so.is_file():
        return str(so)
    try:
        spec = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.origin:
        so = Path(spec.origin).parent / "xla_cuda_plugin.so"
        if so.is_file():
            return str(so)
    return None


_C_API: list[Any] = []  # the plugin, loaded once per process


def _cuda_topology(topology: str, target_config: str) -> Any:
    from jax._src import xla_bridge as xb
    from jax._src.lib import xla_client

    if not _C_API and xla_client.pjrt_plugin_loaded("cuda"):  # JAX found a plugin: its own
        return xb.make_pjrt_topology("cuda", "", topology=topology, target_config=target_config)
    if not _C_API:
        path = plugin_library()
        if path is None:
            import jax

            raise UsageError("compiling for a GPU needs jax's CUDA PJRT plugin (no GPU or CUDA "
                             "libraries needed): make setup installs it; or pip install --no-deps "
                             f"--target <venv>/gpu-plan jax-cuda12-pjrt=={jax.__version__}")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # "no CUDA driver": none is needed
        _C_API.append(xla_client.load_pjrt_plugin_dynamically("cuda", path))
    return xla_client.make_c_api_device_topology(_C_API[0], "", topology=topology,
                                                 target_config=target_config)


def gpu_topology_devices(name: str) -> tuple[list[Any], int]:
    """(compile-only devices, usable bytes per GPU) for "h100", "h100:N" or "h100:HxN"."""
    target, hosts, per_host = parse_gpu_topology(name)
    try:
        topo = _cuda_topology(f"1x{hosts}x{per_host}", GPU_TARGETS[target])
        devices = list(topo._make_compile_only_devices())
    except UsageError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"topology {name!r}: {msg}") from None
    return devices, int(device_memory_bytes(target) * mem_fraction())


__all__ = ["GPU_TARGETS", "H100_SXM", "is_gpu_topology", "parse_gpu_topology", "gpu_topology_devices",
           "device_memory_bytes", "mem_fraction", "plugin_library"]
