"""Trainer checkpoints in JAX. Mirror: `ppo_torch/checkpoint.py`.

A checkpoint directory (made atomic by `ppo_rlhf.runtime.checkpoints.CheckpointManager`, which also writes the
trainer state -- iteration, KL coefficient, counters, config -- and a checksummed manifest) holds:

    state/      Orbax PyTree checkpoint of {"params": policy (+ critic) params, "opt_state": AdamW}
                -- what is trained: with LoRA only the adapters (+ a LoRA critic's head) and
                their moments, the base weights being the policy's checkpoint, reloaded on resume
                -- restored bit-exactly into the trainer's own tree structure AND shardings:
                sharded over a mesh, every process writes and reads only its own shards (a
                checkpoint restores onto any mesh, or onto one device). The tree is the
                models' own: each model's blocks stacked, one [layers, ...] array per
                parameter (`ppo_jax.models.stack`), so a state/ written before the layers were
                stacked (per-layer arrays) does not restore: a CheckpointError naming it
    policy/     the policy in Hugging Face format (+ tokenizer), loadable by `transformers`,
                `ppo-rlhf eval` and either backend; with LoRA its PEFT adapter, pointing to
                its base (`PPOTrainer.save_policy`)

Prompt order, minibatch order and sampling keys are functions of (seed, iteration), so the
iteration number is all the "data position" and RNG state a resume needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from ppo_rlhf.errors import CheckpointError


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _save_state(path: str | os.PathLike, tree: Any) -> None:
    """An Orbax PyTree checkpoint of `tree` at `path` (written when this returns)."""
    ckptr = _checkpointer()
    ckptr.save(Path(path).absolute(), tree)
    ckptr.wait_until_finished()


def _restore_state(path: str | os.PathLike, target: Any) -> Any:
    """The tree saved at `path`, restored bit-exactly into `target`'s structure, dtypes AND
    shardings; CheckpointError naming the checkpoint when it cannot be."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            target)
    try:
        return _checkpointer().restore(Path(path).absolute(), abstract)
    except Exception as e:  # Orbax raises many types; name the checkpoint
        raise CheckpointError(f"{Path(path).parent}: cannot restore the trainer state: {e}") from None


def save_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    _save_state(Path(path) / "state", {"params": trainer.params, "opt_state": trainer.opt_state})
    trainer.save_policy(Path(path) / "policy")


def load_trainer_state(trainer: Any, path: str | os.PathLike) -> None:
    restored = _restore_state(Path(path) / "state",
                             {"params": trainer.params, "opt_state": trainer.opt_state})
    trainer.params, trainer.opt_state = restored["params"], restored["opt_state"]


class SupervisedCheckpoint:
    """save_model / save_checkpoint / load_checkpoint of the reward-model and SFT trainers (anything
    with `params`, `opt_state`, `model()` and the base's `_save_tokenizer`): state/ = Orbax {params,
    opt_state}, model/ = the Hugging Face checkpoint, with LoRA the PEFT adapter (`save_model`). The
    learning rate is a function of the step count, which
    `ppo_rlhf.runtime.checkpoints.CheckpointManager` keeps in the trainer state."""

    params: Any
    opt_state: Any

    def save_model(self, path: str | os.PathLike, *, merge: bool = False) -> None:
        """The trained model (a reward model with its gain / bias) + tokenizer as a Hugging Face
        checkpoint: loads in both backends and in transformers. With LoRA, its PEFT adapter
        (`lora.save_adapter`: adapter_config.json, whose base_model_name_or_path is the model's
        checkpoint dir, adapter_model.safetensors; a reward model's also holds its score head and
        reward_normalisation.json) -- or with merge=True the full checkpoint of the adapters
        merged into the base (`merge_adapters`). Both cores' `load_pretrained` /
        `load_scalar_model` load either."""
        from ppo_jax.models import model_options, save_pretrained
        from ppo_jax.models.lora import merge_adapters, save_adapter

        model = self.model()
        if model_options(model).lora and not merge:
            save_adapter(model, path, base_model=self.model_source)
        else:
            save_pretrained(merge_adapters(model) if model_options(model).lora else model, path)
        self._save_tokenizer(path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        _save_state(Path(path) / "state", {"params": self.params, "opt_state": self.opt_state})
        self.save_model(Path(path) / "model")

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        restored = _restore_state(Path(path) / "state",
                                 {"params": self.params, "opt_state": self.opt_state})
        self.params, self.opt_state = restored["params"], restored["opt_state"]
