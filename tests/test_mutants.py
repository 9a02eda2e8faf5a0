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


def test_every_mutant_still_applies_to_the_tree():
    """Fast guard for the slow run: each mutant's text occurs exactly once where it says (a
    refactoring that moves the guarded line must move the mutant with it)."""
    sys.path.insert(0, str(ROOT))
    from tools.mutants import MUTANTS

    for mutant in MUTANTS:
        for rel, old, _ in mutant.edits:
            count = (ROOT / rel).read_text().count(old) if (ROOT / rel).exists() else -1
            assert count == 1, f"{mutant.name}: {rel} holds its text {count} times (-1: no file)"
