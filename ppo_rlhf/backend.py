"""`Backend`: the one face a core (`ppo_jax`, `ppo_torch`) shows the application.

Each core exports one instance, `ppo_<name>.backend.BACKEND`; the application reaches a core only
through `ppo_rlhf.app.backends.get_backend(name)`, which imports it by name. What the app needs and
nothing more: the three trainers, loading a checkpoint, sampling text and the evaluation's
sample-and-score, and how the core scales out. The two cores fill the same fields with the same
signatures (their docstrings: `ppo_jax.models.load_pretrained`, `ppo_jax.sample_text.sample_texts`,
`ppo_jax.evaluate.sample_and_score`, ...), so no code above a core asks which one it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

__all__ = ["Backend"]


@dataclass(frozen=True)
class Backend:
    """One core, as the application sees it.

    name            "jax" or "torch"
    PPOTrainer, RewardModelTrainer, SFTTrainer     the trainers (same constructor arguments but
                    the scaling ones: `mesh=` for a mesh core, `distributed=` for torchrun)
    load_pretrained(path, dtype="float32", *, with_value_head=False, seed=0) -> a causal LM
    load_scalar_model(path, dtype="float32") -> a value / reward model
    sample_texts(model, tokenizer, prompts, *, max_new_tokens, temperature, seed, stream,
                 max_prompt_len, batch_size) -> TextSamples
    sample_and_score(policy_dir, prompts, *, reference, reward_model, ...) -> the evaluation's
                    samples (`ppo_rlhf.eval.policy.summarize` reads them)
    for_sampling(model) -> the model placed where the core samples (torch: the GPU if any)
    scale_out       "mesh": one process drives a device mesh (`--mesh`; several hosts join
                    through `join_processes`); "torchrun": one process per rank
                    (`--distributed ddp|fsdp`), which leaves through `leave_processes`
    join_processes(force) -> bool   (mesh cores) join a multi-process job; True when there are
                    several processes
    leave_processes(exit_code=...)  (torchrun cores) leave the process group and exit the rank
    enable_compile_cache()  (cores that have one) turn on a persistent cache of compiled
                    programs; the CLI calls it before anything compiles, the library never does
    planner         (cores that compile ahead of time: jax) `ppo-rlhf plan`'s functions --
                    topology_devices, plan_ppo / plan_rm / plan_sft, max_batch_size,
                    data_parallel_ways, format_plan
                    (`ppo_jax.plan`); None where a core has no compiler to ask (torch)
    """

    name: str
    PPOTrainer: type
    RewardModelTrainer: type
    SFTTrainer: type
    load_pretrained: Callable[..., Any]
    load_scalar_model: Callable[..., Any]
    sample_texts: Callable[..., Any]
    sample_and_score: Callable[..., Any]
    for_sampling: Callable[[Any], Any]
    scale_out: Literal["mesh", "torchrun"]
    join_processes: Callable[..., bool] | None = None
    leave_processes: Callable[..., None] | None = None
    enable_compile_cache: Callable[[], Any] | None = None
    planner: Any = None

    def __post_init__(self) -> None:
        if (self.scale_out == "mesh") != (self.join_processes is not None) or (
                self.scale_out == "torchrun") != (self.leave_processes is not None):
            raise ValueError(f"backend {self.name!r}: a mesh core gives join_processes, a torchrun "
                             f"core leave_processes")
