"""Trainer checkpoints in PyTorch. Mirror: `ppo_jax/checkpoint.py`.

A checkpoint directory (made atomic by `ppo_rlhf.runtime.checkpoints.CheckpointManager`, which also writes the
trainer state -- iteration, KL coefficient, counters, config -- and a checksummed manifest) holds:

    state/model.safetensors   the trained policy (+ critic) parameters, keys "policy.*" /
                              "critic.*": with LoRA only the adapters (+ a LoRA critic's head),
                              the base weights being the policy's checkpoint, reloaded on resume
    state/optimizer.pt        the AdamW state (torch.save; loaded with weights_only=True)
    policy/                   the policy in Hugging Face format (+ tokenizer), loadable by
                              `transformers`, `ppo-rlhf eval` and either backend; with LoRA its
                              PEFT adapter, pointing to its base (`PPOTrainer.save_policy`)

Prompt order, minibatch order and sampling seeds are functions of (seed, iteration), so the
iteration number is all the "data position" and RNG state a resume needs.

Distributed (`ppo_torch/parallel.py`): rank 0 writes the files. With FSDP2 every rank first
takes part in gathering the full tensors, so the files are the single-process ones; on load every
rank reads them and keeps its own shards. A checkpoint resumes with or without distribution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ppo_rlhf.errors import CheckpointError


def _named_params(trainer: Any) -> dict[str, torch.nn.Parameter]:
    out = {}
    modules = {"policy": trainer.policy}
    if trainer.critic is not None:
        modules["critic"] = trainer.critic
    for prefix, m in modules.items():
        for name, p in m.named_parameters(remove_duplicate=True):
            if p.requires_grad:  # what is trained (with LoRA: the adapters, not the base)
                out[f"{prefix}.{name}"] = p
    return out


def _named_tensors(trainer: Any) -> dict[str, torch.Tensor]:
    full = trainer.parallel.full_tensor  # FSDP2: gathered from the shards (every rank calls)
    return {k: full(p.detach()).cpu().contiguous() for k, p in _named_params(trainer).items()}


def _optimizer_state(trainer: Any) -> dict:
    sd = trainer.optimizer.state_dict()
    full = trainer.parallel.full_tensor
    sd["state"] = {i: {k: full(v) if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def save_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    state = Path(path) / "state"
    tensors, optimizer = _named_tensors(trainer), _optimizer_state(trainer)
    if trainer.processes.is_main:
        state.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(state / "model.safetensors"))
        torch.save(optimizer, state / "optimizer.pt")
    trainer.save_policy(Path(path) / "policy")


def _read_state(path: str | os.PathLike, device: Any) -> tuple[dict, dict]:
    """(weights, optimizer state dict) of a checkpoint's state/ dir; CheckpointError naming
    the checkpoint whatever fails."""
    state = Path(path) / "state"
    try:
        tensors = load_file(str(state / "model.safetensors"))
        opt = torch.load(state / "optimizer.pt", weights_only=True, map_location=device)
    except Exception as e:  # name the checkpoint, whatever failed
        raise CheckpointError(f"{path}: cannot restore the trainer state: {e}") from None
    return tensors, opt


def load_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    tensors, opt = _read_state(path, trainer.device)
    current = _named_params(trainer)
    if set(tensors) != set(current):
        raise CheckpointError(f"{path}: parameter names differ from this trainer's "
                                f"(missing {sorted(set(current) - set(tensors))[:5]}, "
                                f"unexpected {sorted(set(tensors) - set(current))[:5]})")
    with torch.no_grad():
        for key, p in current.items():
            p.copy_(trainer.parallel.shard_like(tensors[key].to(p.device, p.dtype), p))
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for i, s in opt["state"].items():  # FSDP2: AdamW's moments are sharded like their parameter
        s.update({k: trainer.parallel.shard_like(v, params[int(i)]) for k, v in s.items()
                  if torch.is_tensor(v) and v.shape == params[int(i)].shape})
    trainer.optimizer.load_state_dict(opt)


class SupervisedCheckpoint:
    """save_model / save_checkpoint / load_checkpoint of the reward-model and SFT trainers
    (anything with a module `_model`, an `optimizer`, a `device`, `model()` and the base's
    `_save_tokenizer`): state/model.safetensors + state/optimizer.pt (AdamW), model/ = the
    Hugging Face checkpoint, with LoRA the PEFT adapter (`save_model`). The learning rate is a
    function of the step count, which `ppo_rlhf.runtime.checkpoints.CheckpointManager` keeps in the trainer
    state."""

    _model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: Any

    def save_model(self, path: str | os.PathLike, *, merge: bool = False) -> None:
        """The trained model (a reward model with its gain / bias) + tokenizer as a Hugging Face
        checkpoint: loads in both backends and in transformers. With LoRA, its PEFT adapter
        (`lora.save_adapter`: adapter_config.json, whose base_model_name_or_path is the model's
        checkpoint dir, adapter_model.safetensors; a reward model's also holds its score head and
        reward_normalisation.json) -- or with merge=True the full checkpoint of the adapters
        merged into the base (`merge_adapters`). Both cores' `load_pretrained` /
        `load_scalar_model` load either."""
        from ppo_torch.models import model_options, save_pretrained
        from ppo_torch.models.lora import merge_adapters, save_adapter

        model = self.model()
        if model_options(model).lora and not merge:
            save_adapter(model, path, base_model=self.model_source)
        else:
            save_pretrained(merge_adapters(model) if model_options(model).lora else model, path)
        self._save_tokenizer(path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        state = Path(path) / "state"
        state.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in self._model.named_parameters()
                   if p.requires_grad}, str(state / "model.safetensors"))  # what is trained
        torch.save(self.optimizer.state_dict(), state / "optimizer.pt")
        self.save_model(Path(path) / "model")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        tensors, opt = _read_state(path, self.device)
        with torch.no_grad():
            for name, p in self._model.named_parameters():
                if p.requires_grad:  # what is trained (LoRA: the adapters, the base reloaded)
                    p.copy_(tensors[name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(opt)
