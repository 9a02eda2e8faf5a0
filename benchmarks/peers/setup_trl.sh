#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-trl: TRL 1.12.0 (the last release with PPOTrainer, under
# trl.experimental.ppo) on the CPU build of torch 2.13.0. Kept apart from the project's own
# environment so that TRL's pins never constrain ours.
#
# torch is installed FIRST and pinned: this machine has a CPU wheel of torch 2.13.0 on disk, and an
# unpinned torch (asked for by trl/accelerate) would pull a multi-GB CUDA build instead. Every later
# install passes the same pin as a constraint so nothing can move it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-trl}"
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
$pip install torch==2.13.0
pin="$(mktemp)"; trap 'rm -f "$pin"' EXIT
# The versions these benchmarks were measured with (results/*.json record them too).
cat > "$pin" <<'PINS'
torch==2.13.0
transformers==5.24.0
accelerate==1.15.0
datasets==5.2.0
PINS
$pip install -c "$pin" trl==1.12.0
"$venv/bin/python" - <<'PY'
import torch, trl, transformers
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401  (fails loudly if absent)
print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)
PY
