"""Run pytest with torch and XLA held to other CPU kernels than this machine's defaults.

    python tools/kernel_variants.py [--variants NAME,...] [-- PYTEST ARGS]   (default: parity_tests)
    python tools/kernel_variants.py --list

Float32 results depend on the order in which a kernel sums, and that order depends on the CPU:
torch picks its ATen kernels by instruction set (AVX-512 / AVX2 / default), oneMKL its GEMM
kernels by instruction set AND vendor (generic on AMD, AVX-512 on Intel), oneDNN likewise, and
XLA:CPU compiles for the host's instruction set. A parity tolerance measured on one machine can
therefore fail on the next (issue 13: a test passed on AMD EPYC and failed on Intel Xeon). Each
variant below runs the same tests under other kernels on THIS machine; a tolerance that is
justified by its mechanism holds under every one of them (README, "Parity").

Variants (each a set of environment variables; several may be given):
  avx2          torch ATen + oneDNN + MKL capped at AVX2, XLA:CPU at AVX2
  default-isa   torch ATen at its baseline (no AVX), MKL at SSE4.2, XLA at SSE4.2
  intel-mkl     oneMKL dispatches as on an Intel CPU (tools/mkl_intel_dispatch.c, preloaded;
                a no-op on Intel), ATen at AVX-512 where the CPU has it
  intel-avx2    intel-mkl capped at AVX2, ATen and oneDNN at AVX2, XLA at SSE4.2: differs from
                the default kernels on AMD and Intel alike (what `make test-portable` runs in CI)
  one-thread    torch and XLA on one thread (other reduction splits)

Exit status: 0 when every variant passed, 1 otherwise. Needs gcc for the intel-* variants.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM_SRC = ROOT / "tools" / "mkl_intel_dispatch.c"
XLA = "--xla_cpu_max_isa="

VARIANTS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "XLA_FLAGS": XLA + "AVX2"},
    "default-isa": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "XLA_FLAGS": XLA + "SSE4_2"},
    "intel-mkl": {"LD_PRELOAD": "{shim}"},
    "intel-avx2": {"LD_PRELOAD": "{shim}", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "XLA_FLAGS": XLA + "SSE4_2"},
    "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                   "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
}


def build_shim(out_dir: Path) -> Path:
    """Compile tools/mkl_intel_dispatch.c into a shared library (gcc or cc)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("kernel_variants: the intel-* variants need gcc (apt-get install gcc)")
    lib = out_dir / "libmkl_intel_dispatch.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(SHIM_SRC)], check=True)
    return lib


def variant_env(name: str, shim: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in VARIANTS[name].items():
        value = value.format(shim=shim)
        if key == "XLA_FLAGS" and env.get("XLA_FLAGS"):
            value = env["XLA_FLAGS"] + " " + value  # keep e.g. a simulated device count
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = ["-q", "parity_tests"]
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="intel-avx2",
                    help=f"comma-separated, from: {', '.join(VARIANTS)} (default intel-avx2)")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, env in VARIANTS.items():
            print(f"{name:12s} " + " ".join(f"{k}={v}" for k, v in env.items()))
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shim = build_shim(Path(tmp)) if any("LD_PRELOAD" in VARIANTS[n] for n in names) else None
        for name in names:
            env = variant_env(name, shim)
            shown = " ".join(f"{k}={env[k]}" for k in VARIANTS[name])
            print(f"=== kernel variant {name}: {shown}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, env=env).returncode
            results.append((name, rc, time.monotonic() - t0))
    for name, rc, secs in results:
        print(f"kernel variant {name}: {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {secs:.0f} s")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
