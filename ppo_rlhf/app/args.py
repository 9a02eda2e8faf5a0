"""Command-line arguments every training command shares (train, train-rm, pretrain): the memory
switches of the update (activation checkpointing, mixed precision) and the run's bookkeeping
(checkpoint cadence, resume, progress bar, TensorBoard). One definition, so the three commands
cannot drift apart."""

from __future__ import annotations

import argparse

from ppo_rlhf.config import COMPUTE_DTYPES, REMATS


def add_memory_args(p: argparse.ArgumentParser, *, config: str, models: str) -> None:
    """--remat, --compute-dtype and --scan-unroll (None when not given: the config's own value
    stands)."""
    p.add_argument("--remat", choices=REMATS,
                   help=f"activation checkpointing of {models} layers: none (keep every "
                        "activation), full (recompute each layer in the backward), dots (keep the "
                        "weight matmuls' outputs, recompute the rest); the same steps up to float32 "
                        f"rounding, less memory, more compute ({config}.remat; default: none)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES,
                   help="mixed precision: matmuls in this dtype, weights and optimiser state in "
                        "the weights' dtype (e.g. bfloat16 compute with float32 master weights); "
                        "norms, softmaxes, log-probs and losses stay float32 "
                        f"({config}.compute_dtype; default: the weights' dtype)")
    p.add_argument("--scan-unroll", action="store_true", default=None,
                   help="JAX: run the scan over the layers fully unrolled (faster for shallow "
                        "models on CPU; compile time grows with depth); torch: no effect "
                        f"({config}.scan_unroll; default: a loop)")


def _number(text: str) -> int | float | str:
    """A number as given (int, float), else the text: the config's one check names a bad value
    in one line (`ppo_rlhf.lora.check_lora_options`), rather than argparse's usage block."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def add_lora_args(p: argparse.ArgumentParser, *, config: str, roles: str | None, saved: str,
                  merged: str) -> None:
    """--lora-rank, --lora-alpha, --lora-dropout, --lora-base-dtype, --lora-targets (None when
    not given: the config's own value stands), --merge; with `roles` (PPO: several models) also
    --lora-roles. With LoRA a command saves the trained model as a PEFT adapter at `saved` (a
    pointer to its base + the adapters), and --merge adds the full merged checkpoint at `merged`."""
    g = p.add_argument_group("LoRA (low-rank adapters; only they are trained)")
    g.add_argument("--lora-rank", type=_number, metavar="R",
                   help=f"train rank-R LoRA adapters on {roles or 'the model'} instead of all the "
                        f"weights, the base weights frozen ({config}.lora_rank; default 0: no LoRA)")
    g.add_argument("--lora-alpha", type=_number, metavar="A",
                   help=f"the adapters' term is scaled by A / R ({config}.lora_alpha; default 8)")
    g.add_argument("--lora-dropout", type=float, metavar="P",
                   help=f"dropout on the adapters' input in the training forwards only, as peft's "
                        f"({config}.lora_dropout; default 0)")
    g.add_argument("--lora-base-dtype", choices=("float32", "bfloat16"),
                   help=f"store the frozen base weights in this dtype -- bfloat16 halves their "
                        f"memory; needs --compute-dtype bfloat16 -- while the adapters (and a trained "
                        f"head) stay float32 ({config}.lora_base_dtype; default: the weights' dtype)")
    g.add_argument("--lora-targets", metavar="q,v,...",
                   help="the projections that get adapters, among q, k, v, o, gate, up, down "
                        f"({config}.lora_targets; default q,v)")
    if roles is not None:
        g.add_argument("--lora-roles", metavar="ROLE,...",
                       help=f"the models that get adapters: {roles} ({config}.lora_roles)")
    g.add_argument("--merge", action="store_true",
                   help=f"with --lora-rank: also write {merged}: the adapters merged into the base, "
                        f"a full Hugging Face checkpoint ({saved} holds the PEFT adapter, whose "
                        f"adapter_config.json names the base checkpoint dir)")


def add_run_args(p: argparse.ArgumentParser, *, checkpoint_every: int, unit: str) -> None:
    """--checkpoint-every (in `unit`s), --resume, --no-progress, --report-to."""
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, metavar="N",
                   help=f"atomic checkpoint every N {unit} (and at the end); 0 = only at the end "
                        f"(default: {checkpoint_every})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                   help="also write the metrics as TensorBoard scalars to OUT/tensorboard "
                        "(needs tensorboardX; default: none)")
