"""ppo_rlhf.app.backends: the one place backend-neutral code reaches ppo_jax / ppo_torch."""

from __future__ import annotations

import builtins

import pytest

from ppo_rlhf.app.backends import BACKENDS, backend_module
from ppo_rlhf.errors import UsageError


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_module_imports_the_mirror_module(backend):
    mod = backend_module(backend, "losses")
    assert mod.__name__ == f"ppo_{backend}.losses" and callable(mod.policy_loss)


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown backend 'tf': choose one of jax, torch"):
        backend_module("tf", "ppo")


def test_missing_backend_names_the_extra_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.delitem(__import__("sys").modules, "ppo_torch.evaluate", raising=False)
    with pytest.raises(UsageError, match=r"the torch backend is not installed \(No module named "
                                         r"'torch'\); pip install 'ppo-rlhf\[torch\]'"):
        backend_module("torch", "evaluate")
