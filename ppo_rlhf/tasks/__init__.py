"""Tasks: a prompt distribution, a pretraining corpus, a gold reward and its preference data.

A `Task` bundles what an end-to-end RLHF run needs from its problem domain. Built-in tasks are
imported only when asked for (`get_task("reviews")`, `get_task("arithmetic")`); others can be added with `register_task`
or named as "package.module:ATTRIBUTE" (an attribute holding a `Task`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ppo_rlhf.errors import UsageError

__all__ = ["Task", "get_task", "register_task", "task_names"]


@dataclass(frozen=True)
class Task:
    """One task. Callables (see `ppo_rlhf.tasks.reviews` for the reference implementation):

    gold_reward(prompts, responses) -> list[float]   the stand-in for human judgement
    train_prompts() -> list[str]                     prompts for PPO
    eval_prompts() -> list[str]                      held-out prompts for evaluation
    generate_corpus(n, *, seed) -> [(prompt, response)]   pretraining data
    preference_data(n, *, seed, temperature, ...)    labeller output (records + noise ceiling)
    build_tokenizer(out_dir=None) -> tokenizers.Tokenizer (saved as a HF tokenizer dir)
    max_prompt_tokens, max_response_tokens           lengths the task is designed for
    gold_range                                       (lo, hi) bounds of the gold reward
    demo_model_config(size, *, vocab_size) -> dict   optional: config.json of a model to pre-train
                                                     from scratch (`pretrain` without --model)
    well_formed(prompt, response) -> bool            optional: is the response well formed (the
                                                     evaluation's share); default: gold > -1
    verifiable                                       the gold reward is a checker (exact answers,
                                                     e.g. `arithmetic`), not a stand-in for human
                                                     judgement: RL may train on it directly (the
                                                     demo then skips feedback and reward model)
    """

    name: str
    description: str
    gold_reward: Callable[..., list[float]]
    train_prompts: Callable[[], list[str]]
    eval_prompts: Callable[[], list[str]]
    generate_corpus: Callable[..., list[tuple[str, str]]]
    preference_data: Callable[..., Any]
    build_tokenizer: Callable[..., Any]
    max_prompt_tokens: int
    max_response_tokens: int
    gold_range: tuple[float, float]
    demo_model_config: Callable[..., dict[str, Any]] | None = None
    well_formed: Callable[[str, str], bool] | None = None
    verifiable: bool = False


_BUILTIN: dict[str, str] = {"reviews": "ppo_rlhf.tasks.reviews:TASK",
                            "arithmetic": "ppo_rlhf.tasks.arithmetic:TASK"}
_REGISTERED: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> None:
    """Make `task` available as `get_task(task.name)`."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    if not replace and (task.name in _REGISTERED or task.name in _BUILTIN):
        raise ValueError(f"a task named {task.name!r} exists already (pass replace=True)")
    _REGISTERED[task.name] = task


def task_names() -> list[str]:
    """Names of the built-in and registered tasks."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def _load(spec: str) -> Task:
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import the task module {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Task):
        raise UsageError(f"{spec} is a {type(obj).__name__}, not a ppo_rlhf.tasks.Task")
    return obj


def get_task(name: str) -> Task:
    """A task by name ("reviews", a registered name) or as "package.module:ATTRIBUTE"."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _load(_BUILTIN[name])
    if ":" in name:
        return _load(name)
    raise UsageError(f"unknown task {name!r}: choose one of {', '.join(task_names())} or give "
                     f"'package.module:ATTRIBUTE'")
