"""Mutation testing as a habit (tools/mutants.py): every planted bug in the PPO math -- masks,
micro-batch weights, temperature, clipping, GAE's terminal step, where the score lands, the
critic's scale, the shared host code -- must make a fast parity or formula test fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_every_listed_mutant_is_killed():
    out = subprocess.run([sys.executable, "tools/mutants.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mutants killed" in out.stdout and "SURVIVED" not in out.stdout
