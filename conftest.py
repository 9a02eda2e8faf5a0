"""Shared fixtures: tiny random Hugging Face checkpoints, built offline once per session."""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download (Makefile sets it too)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, **kw) -> Path: `ppo_rlhf.testing.make_tiny_checkpoint(dir, arch, **kw)`,
    built on first use and cached for the session (per xdist worker) by its arguments."""
    from ppo_rlhf.testing import make_tiny_checkpoint

    cache: dict = {}

    def get(arch: str, **kw):
        key = (arch, repr(sorted(kw.items())))  # values may be dicts (rope_parameters)
        if key not in cache:
            name = "-".join([arch] + [f"{k}={v}" for k, v in sorted(kw.items())])
            name = re.sub(r"[^A-Za-z0-9_.=-]", "_", name)[:80]
            cache[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, **kw)
        return cache[key]

    return get
