"""Trainer checkpoints in PyTorch. Mirror: `ppo_jax/checkpoint.py`.

A checkpoint directory (made atomic by `ppo_rlhf.ckpt.CheckpointManager`, which also writes the
trainer state -- iteration, KL coefficient, counters, config -- and a checksummed manifest) holds:

    state/model.safetensors   policy (+ critic) parameters, keys "policy.*" / "critic.*"
    state/optimizer.pt        the AdamW state (torch.save; loaded with weights_only=True)
    policy/                   the policy in Hugging Face format (+ tokenizer), loadable by
                              `transformers`, `ppo-rlhf eval` and either backend

Prompt order, minibatch order and sampling seeds are functions of (seed, iteration), so the
iteration number is all the "data position" and RNG state a resume needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ppo_rlhf.ckpt import CorruptCheckpoint


def _named_tensors(trainer: Any) -> dict[str, torch.Tensor]:
    out = {}
    modules = {"policy": trainer.policy}
    if trainer.critic is not None:
        modules["critic"] = trainer.critic
    for prefix, m in modules.items():
        for name, p in m.named_parameters(remove_duplicate=True):
            out[f"{prefix}.{name}"] = p.detach().cpu().contiguous()
    return out


def save_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    state = Path(path) / "state"
    state.mkdir(parents=True, exist_ok=True)
    save_file(_named_tensors(trainer), str(state / "model.safetensors"))
    torch.save(trainer.optimizer.state_dict(), state / "optimizer.pt")
    trainer.save_policy(Path(path) / "policy")


def load_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    state = Path(path) / "state"
    try:
        tensors = load_file(str(state / "model.safetensors"))
        opt = torch.load(state / "optimizer.pt", weights_only=True, map_location=trainer.device)
    except Exception as e:  # noqa: BLE001 -- name the checkpoint, whatever failed
        raise CorruptCheckpoint(f"{path}: cannot restore the trainer state: {e}") from None
    current = _named_tensors(trainer)
    if set(tensors) != set(current):
        raise CorruptCheckpoint(f"{path}: parameter names differ from this trainer's "
                                f"(missing {sorted(set(current) - set(tensors))[:5]}, "
                                f"unexpected {sorted(set(tensors) - set(current))[:5]})")
    modules = {"policy": trainer.policy, "critic": trainer.critic}
    with torch.no_grad():
        for prefix, m in modules.items():
            if m is None:
                continue
            for name, p in m.named_parameters(remove_duplicate=True):
                p.copy_(tensors[f"{prefix}.{name}"].to(p.device, p.dtype))
    trainer.optimizer.load_state_dict(opt)
