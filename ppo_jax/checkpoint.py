"""Trainer checkpoints in JAX. Mirror: `ppo_torch/checkpoint.py`.

A checkpoint directory (made atomic by `ppo_rlhf.ckpt.CheckpointManager`, which also writes the
trainer state -- iteration, KL coefficient, counters, config -- and a checksummed manifest) holds:

    state/      Orbax PyTree checkpoint of {"params": policy (+ critic) params, "opt_state": AdamW}
                -- restored bit-exactly into the trainer's own tree structure AND shardings:
                sharded over a mesh, every process writes and reads only its own shards (a
                checkpoint restores onto any mesh, or onto one device)
    policy/     the policy in Hugging Face format (+ tokenizer), loadable by `transformers`,
                `ppo-rlhf eval` and either backend

Prompt order, minibatch order and sampling keys are functions of (seed, iteration), so the
iteration number is all the "data position" and RNG state a resume needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from ppo_rlhf.ckpt import CorruptCheckpoint


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    path = Path(path).absolute()
    ckptr = _checkpointer()
    ckptr.save(path / "state", {"params": trainer.params, "opt_state": trainer.opt_state})
    ckptr.wait_until_finished()
    trainer.save_policy(path / "policy")


def load_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    path = Path(path).absolute()
    target = {"params": trainer.params, "opt_state": trainer.opt_state}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            target)
    try:
        restored = _checkpointer().restore(path / "state", abstract)
    except Exception as e:  # noqa: BLE001 -- Orbax raises many types; name the checkpoint
        raise CorruptCheckpoint(f"{path}: cannot restore the trainer state: {e}") from None
    trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]
