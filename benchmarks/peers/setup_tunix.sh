#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-tunix: google-tunix 0.1.7 (JAX/Flax NNX) on the CPU build of
# jax. Kept apart from the project's own environment so Tunix's pins never constrain ours.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-tunix}"
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
# Pinned to the versions these benchmarks were measured with (results/*.json record them too); the
# pins also spare pip a long backtrack over transformers releases.
pin="$(mktemp)"; trap 'rm -f "$pin"' EXIT
cat > "$pin" <<'PINS'
jax==0.10.2
jaxlib==0.10.2
flax==0.12.8
optax==0.2.8
transformers==5.12.1
safetensors==0.7.0
tokenizers==0.22.2
PINS
$pip install -c "$pin" google-tunix==0.1.7
"$venv/bin/python" - <<'PY'
import jax, flax, tunix  # noqa: F401
from tunix.rl.ppo import ppo_learner  # noqa: F401  (fails loudly if absent)
from importlib.metadata import version
print("jax", jax.__version__, "flax", flax.__version__, "tunix", version("google-tunix"),
      "devices", jax.devices())
PY
