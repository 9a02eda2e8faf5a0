"""ppo_rlhf.app.backends: the one place the application reaches a core, as the `Backend` each core
exports -- the same face, filled the same way, by both."""

from __future__ import annotations

import builtins
import dataclasses
import inspect

import pytest

from ppo_rlhf.app.backends import BACKENDS, get_backend
from ppo_rlhf.backend import Backend
from ppo_rlhf.errors import UsageError

CALLABLES = ("load_pretrained", "load_scalar_model", "sample_texts", "sample_and_score")
SCALING = {"mesh", "distributed", "device", "compile"}  # how each core is placed: its own words


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_core_exports_its_backend(backend):
    core = get_backend(backend)
    assert isinstance(core, Backend) and core.name == backend
    for name in ("PPOTrainer", "RewardModelTrainer", "SFTTrainer"):
        assert getattr(core, name).__module__.startswith(f"ppo_{backend}."), name


OWN = {"attn_implementation", "abstract"}  # torch's attention kernel; JAX's weightless build (plan)


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in SCALING | OWN]


def test_both_cores_fill_the_face_with_the_same_signatures():
    """The app calls either core the same way: every callable and trainer constructor takes the
    same parameters in both (but the scaling ones and each core's own: torch's attention-kernel
    choice, JAX's abstract build)."""
    jax_core, torch_core = get_backend("jax"), get_backend("torch")
    for name in CALLABLES:
        assert _parameters(getattr(jax_core, name)) == _parameters(getattr(torch_core, name)), name
    for name in ("PPOTrainer", "RewardModelTrainer", "SFTTrainer"):
        assert (_parameters(getattr(jax_core, name).__init__)
                == _parameters(getattr(torch_core, name).__init__)), name
    assert {jax_core.scale_out, torch_core.scale_out} == {"mesh", "torchrun"}


def test_a_core_must_say_how_it_scales_out():
    fields = {f.name: None for f in dataclasses.fields(Backend) if f.default is dataclasses.MISSING}
    with pytest.raises(ValueError, match="a mesh core gives join_processes"):
        Backend(**{**fields, "name": "x", "scale_out": "mesh"})
    Backend(**{**fields, "name": "x", "scale_out": "mesh", "join_processes": lambda force=None: False})


def test_unknown_backend_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown backend 'tf': choose one of jax, torch"):
        get_backend("tf")


def test_missing_backend_names_the_extra_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.delitem(__import__("sys").modules, "ppo_torch.backend", raising=False)
    with pytest.raises(UsageError, match=r"the torch backend is not installed \(No module named "
                                         r"'torch'\); pip install 'ppo-rlhf\[torch\]'"):
        get_backend("torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainers_own_their_loop_and_build_their_models_with_the_kit(backend, tiny_checkpoint):
    """Composed, not inherited: no trainer is a `HostLoop` -- each owns one (`trainer.loop`,
    whose counter is the trainer's), and the core's `MODEL_KIT` (what `runtime.roles` builds the
    PPO roles from) is filled from its own models package."""
    import importlib

    from ppo_rlhf.config import SFTConfig
    from ppo_rlhf.runtime.loop import HostLoop
    from ppo_rlhf.runtime.roles import ModelKit

    core = get_backend(backend)
    for name in ("PPOTrainer", "RewardModelTrainer", "SFTTrainer"):
        assert HostLoop not in inspect.getmro(getattr(core, name)), name
    models = importlib.import_module(f"ppo_{backend}.models")
    assert isinstance(models.MODEL_KIT, ModelKit)
    assert all(getattr(models.MODEL_KIT, f.name).__module__.startswith(f"ppo_{backend}.")
               for f in dataclasses.fields(ModelKit) if f.name != "unused_options")
    trainer = core.SFTTrainer(str(tiny_checkpoint("gpt2")), SFTConfig(batch_size=2, max_length=8))
    assert isinstance(trainer.loop, HostLoop) and trainer.loop.trainer is trainer
    trainer.step = 3
    assert trainer.loop.position == 3 and trainer.loop.counter == "step"
