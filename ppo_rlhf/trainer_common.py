"""What the JAX and PyTorch trainers share: host-side glue around `ppo.py` (backend-neutral).

The backend files (`ppo_jax/ppo.py`, `ppo_torch/ppo.py`) hold the math of an iteration; this base
class holds everything that is the same in both and touches no array library: tokenizer and
prompt handling, host-side rewards, the missing-EOS penalty, stats, the training loop with
metrics, progress bar, checkpoints, resume, signals and the non-finite-update guard.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ppo_rlhf import loop
from ppo_rlhf.ckpt import CheckpointManager
from ppo_rlhf.config import PPOConfig
from ppo_rlhf.errors import UsageError
from ppo_rlhf.parallel import SINGLE_PROCESS, Processes
from ppo_rlhf.rewards import ScoreRequest, check_scores
from ppo_rlhf.rollout import RolloutBatch

_FROM_TOKENIZER = -1


def resolve_reward_spec(reward: Any, native_cls: type) -> tuple[str, Any]:
    """("dir", path) for a reward-model checkpoint dir, ("native", model) for the backend's own
    scalar model, ("host", obj) for a RewardModel/RewardFn scored on the host."""
    if isinstance(reward, (str, os.PathLike)):
        if not Path(reward).is_dir():
            raise UsageError(f"reward model dir {str(reward)!r} does not exist")
        return "dir", reward
    if isinstance(reward, native_cls):
        return "native", reward
    return "host", reward


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Does the directory `path` hold tokenizer files?"""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency of both extras
        raise UsageError(f"loading a tokenizer needs transformers: {e}") from None
    if Path(path).is_dir() and not has_tokenizer(path):
        # transformers 5 would build an EMPTY tokenizer from such a dir instead of failing
        raise UsageError(f"no tokenizer in {str(path)!r} (expected one of "
                         f"{', '.join(TOKENIZER_FILES)}); save one there with "
                         f"tokenizer.save_pretrained(dir) or pass tokenizer=")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None


REWARD_FN_HINT = ("to score with a reward model of another tokenizer, wrap it in a RewardFn that "
                  "re-tokenises the decoded text (docs/reliability.md)")


def check_positions(need: int, what: str, fix: str, configs: Sequence[Any]) -> None:
    """Sequences of `need` tokens fit every model whose positions are learned embeddings (GPT-2:
    nothing past n_positions exists); UsageError naming `what` and the `fix` otherwise. Rotary
    models (Llama, Qwen2, NeoX) have no hard limit and are not checked."""
    for c in configs:
        if getattr(c, "model_type", None) != "gpt2":
            continue
        limit = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
        if limit is not None and need > int(limit):
            raise UsageError(f"{what} = {need} exceeds the model's n_positions={limit}: {fix}")


def check_vocab(tokenizer: Any, sizes: Mapping[str, int | None]) -> None:
    """All models share one vocabulary (`sizes`: role -> its vocab_size; None = unknown) and the
    tokenizer's ids fit in it. Roles are never re-tokenised through text: a model with another
    vocabulary is refused (UsageError)."""
    known = {role: int(n) for role, n in sizes.items() if n is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{role} {n}" for role, n in known.items())
        raise UsageError(f"the models have different vocabulary sizes ({listed}): they must share "
                         f"one tokenizer; {REWARD_FN_HINT}")
    if tokenizer is not None and known and len(tokenizer) > min(known.values()):
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{min(known.values())}: they do not belong together")


def check_same_tokenizer(tokenizer: Any, path: Any, role: str) -> None:
    """Refuse a `role` checkpoint dir that holds a tokenizer of its own which maps token ids to
    other tokens than `tokenizer` (the policy's): that model would read the policy's token ids
    as other text. A dir without tokenizer files is taken to share the policy's tokenizer (its
    vocabulary size is still checked, `check_vocab`)."""
    if (tokenizer is None or not hasattr(tokenizer, "get_vocab")
            or not isinstance(path, (str, os.PathLike)) or not has_tokenizer(path)):
        return
    ours = {i: t for t, i in tokenizer.get_vocab().items()}
    theirs = {i: t for t, i in load_tokenizer(path).get_vocab().items()}
    ids = set(ours) | set(theirs)
    differ = sum(ours.get(i) != theirs.get(i) for i in ids)
    if differ:
        hint = REWARD_FN_HINT if role == "reward model" else "use one that shares it"
        raise UsageError(f"the {role} {str(path)!r} has its own tokenizer, which differs from the "
                         f"policy's ({differ} of {len(ids)} token ids stand for other tokens): it "
                         f"would read the policy's tokens as other text; {hint}")


class TrainerBase:
    backend = "?"

    def __init__(self, policy: Any, prompts: Any, *, config: PPOConfig, tokenizer: Any,
                 out_dir: Any, extra_rewards: Mapping[str, Callable] | None, eos_token_id: Any,
                 pad_token_id: Any, checkpoint_every: int, keep_checkpoints: int):
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
        if isinstance(checkpoint_every, bool) or int(checkpoint_every) < 0:
            raise UsageError(f"checkpoint_every must be an integer >= 0 (0 = only at the end), "
                             f"got {checkpoint_every!r}")
        self.config = config
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        elif tokenizer is None and isinstance(policy, (str, os.PathLike)):
            tokenizer = load_tokenizer(policy)
        self.tokenizer = tokenizer
        if eos_token_id == _FROM_TOKENIZER:
            eos_token_id = None if tokenizer is None else tokenizer.eos_token_id
        self.eos_token_id = eos_token_id
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        if isinstance(prompts, (str, os.PathLike)):
            from ppo_rlhf.data import load_prompts

            prompts = load_prompts(prompts)
        self.prompt_stream = (None if prompts is None
                              else loop.PromptStream(prompts, config.batch_size, seed=config.seed))
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.extra_rewards = dict(extra_rewards or {})
        self.iteration = 0
        self.checkpoint_every = int(checkpoint_every)
        self.keep_checkpoints = int(keep_checkpoints)
        self.bad_updates = loop.BadUpdateCounter(config.max_bad_updates)
        self.history: list[dict[str, float]] = []
        self._warned_eos = False  # the missing-EOS warning is given once per trainer
        # several processes (a multi-host mesh, torchrun): the backend replaces this; only the
        # main process writes metrics, progress and checkpoint files (ppo_rlhf/parallel.py)
        self.processes: Processes = SINGLE_PROCESS

    def _check_tokenizer_dirs(self, **dirs: Any) -> None:
        """Before loading anything: each role given as a checkpoint dir that holds a tokenizer
        of its own must share the policy's (`check_same_tokenizer`)."""
        for role, path in dirs.items():
            check_same_tokenizer(self.tokenizer, path, role.replace("_", " "))

    def _check_models(self, *models: Any) -> None:
        """All roles (policy, reference, critic, reward model) share one vocabulary, the
        tokenizer's ids fit it and prompt + response fit GPT-2's learned positions. (A reward
        model with another tokenizer is refused rather than re-tokenised through text: wrap it
        in a `RewardFn` that tokenises the decoded text itself if that is what you want.)"""
        roles = ("policy", "reference", "critic", "reward model")
        check_vocab(self.tokenizer, {role: m.config.vocab_size for role, m in zip(roles, models)
                                     if m is not None})
        cfg = self.config
        check_positions(cfg.max_prompt_len + cfg.max_new_tokens,
                        f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len} + {cfg.max_new_tokens}",
                        "lower them (PPOConfig / --set)", [m.config for m in models if m is not None])

    # ---- prompts ---------------------------------------------------------------------------------
    def _prompts_for(self, iteration: int, prompts: Sequence[str] | None, query_ids: Any,
                     query_mask: Any) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
        cfg = self.config
        if query_ids is not None:
            if query_mask is None:
                raise ValueError("query_ids given without query_mask")
            q, qm = np.asarray(query_ids, np.int32), np.asarray(query_mask, np.int32)
            if q.shape != (cfg.batch_size, cfg.max_prompt_len):
                raise ValueError(f"query_ids must have shape (batch_size, max_prompt_len) = "
                                 f"({cfg.batch_size}, {cfg.max_prompt_len}), got {q.shape}")
            return (list(prompts) if prompts is not None else None), q, qm
        if prompts is None:
            if self.prompt_stream is None:
                raise ValueError("no prompts: pass prompts= to the trainer or to step()")
            prompts = self.prompt_stream.batch(iteration)
        prompts = list(prompts)
        if len(prompts) != cfg.batch_size:
            raise ValueError(f"step() needs batch_size={cfg.batch_size} prompts, got {len(prompts)}")
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass tokenizer= to the trainer")
        q, qm, _ = loop.tokenize_prompts(self.tokenizer, prompts, cfg.max_prompt_len)
        return prompts, q, qm

    # ---- rollout: host rewards, missing-EOS penalty, extras ----------------------------------------
    def _finish_rollout(self, arrays: Mapping[str, Any], prompts: Sequence[str] | None) -> RolloutBatch:
        cfg = self.config
        a = {k: self._to_numpy(v) for k, v in arrays.items()}
        n = len(a["response_ids"])  # batch_size, or this rank's share of it (torch distributed)
        texts = None
        if self.tokenizer is not None and (self.host_reward is not None or self.extra_rewards):
            texts = loop.decode_responses(self.tokenizer, a["response_ids"], a["response_mask"])
            if prompts is None:
                prompts = loop.decode_responses(self.tokenizer, a["query_ids"], a["query_mask"])
        if self.host_reward is not None:
            request = ScoreRequest(a["query_ids"], a["query_mask"], a["response_ids"],
                                   a["response_mask"], prompts=prompts, responses=texts)
            a["scores"] = check_scores(self.host_reward.score(request), n, source="reward")
        has_eos = loop.contains_eos(a["response_ids"], a["response_mask"], self.eos_token_id)
        if (cfg.missing_eos_penalty is None and self.eos_token_id is not None
                and self.native_reward is not None and not has_eos.all() and not self._warned_eos):
            self._warned_eos = True
            warnings.warn(f"{int((~has_eos).sum())} of {n} responses end without EOS and are scored "
                          f"by a reward model that was trained on EOS-terminated text; set "
                          f"missing_eos_penalty (e.g. 1.0, as TRL) to penalise them", stacklevel=3)
        if cfg.missing_eos_penalty is not None and self.eos_token_id is not None:
            a["scores"] = np.where(has_eos, a["scores"], a["scores"] - cfg.missing_eos_penalty).astype(a["scores"].dtype)
        extras = {"contains_eos": has_eos.astype(np.int32)}
        for name, fn in self.extra_rewards.items():
            if texts is None:
                raise ValueError(f"extra reward {name!r} scores text: the trainer needs a tokenizer")
            extras[f"extra/{name}"] = check_scores(fn(list(prompts), texts), n,
                                                   source=f"extra reward {name!r}")
        # float64 models (numerics checks) keep their float64 rollouts; otherwise float32
        return RolloutBatch.from_arrays({**a, **extras}, float_dtype=str(a["logprobs"].dtype))

    # ---- stats -----------------------------------------------------------------------------------
    def _collect_stats(self, iteration: int, batch: RolloutBatch, adv: Mapping[str, Any],
                       update: Mapping[str, np.ndarray], kl_coef: float,
                       times: Mapping[str, float]) -> dict[str, float]:
        cfg = self.config
        mask = batch.response_mask.astype(bool)
        kl = np.where(mask, np.asarray(adv["kl"], np.float64), 0.0)  # stats in float64
        scores = batch.scores.astype(np.float64)
        seq_kl = kl.sum(1)
        non_score = (-kl_coef * seq_kl)
        skipped = np.asarray(update["update/skipped"]).astype(bool)
        self.bad_updates.record(skipped.tolist(), iteration)
        s: dict[str, float] = {
            "iteration": iteration,
            "episode": (iteration + 1) * cfg.batch_size,
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float((-np.where(mask, batch.logprobs.astype(np.float64), 0.0).sum(1)).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((scores + non_score).mean()),
            "objective/scores": float(scores.mean()),
            "objective/scores_std": float(scores.std()),
            "objective/kl_coef": float(kl_coef),
            "gen/response_len_mean": float(mask.sum(1).mean()),
            "gen/eos_frac": float(batch.extras["contains_eos"].mean()),
            "val/returns_mean": float(np.asarray(adv["returns"], np.float64)[mask].mean()),
            "val/advantages_mean": float(np.asarray(adv["advantages"], np.float64)[mask].mean()),
            "update/skipped": int(skipped.sum()),
        }
        for k, v in batch.extras.items():
            if k.startswith("extra/"):
                s["objective/" + k[len("extra/"):]] = float(np.mean(v, dtype=np.float64))
        for k, v in update.items():
            v = np.asarray(v, np.float64)
            if k == "update/skipped":
                continue
            if k.endswith("_max"):
                s[k] = float(v.max())
            elif k.endswith("_min"):
                s[k] = float(v.min())
            elif k == "val/ratio":
                s[k] = float(v.mean())
                s["val/ratio_var"] = float(v.var())
            else:
                s[k + "_avg"] = float(v.mean())
        s.update({k: float(v) for k, v in times.items()})
        n_tokens = cfg.batch_size * (cfg.max_prompt_len + cfg.max_new_tokens)
        s["time/tokens_per_s"] = n_tokens / max(times.get("time/iteration_s", 0.0), 1e-9)
        self.history.append(s)
        return s

    # ---- the training loop -----------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "kl_coef": self.kl_ctl.value,
                "bad_updates_consecutive": self.bad_updates.consecutive,
                "bad_updates_total": self.bad_updates.total, "backend": self.backend,
                "config": self.config.to_dict()}

    def _restore_trainer_state(self, state: Mapping[str, Any]) -> None:
        if state.get("backend") not in (None, self.backend):
            raise UsageError(f"checkpoint was written by the {state['backend']} backend; resume it "
                             f"with --backend {state['backend']}")
        self.iteration = int(state["iteration"])
        self.kl_ctl.load_state_dict({"value": state["kl_coef"]})
        self.bad_updates.consecutive = int(state.get("bad_updates_consecutive", 0))
        self.bad_updates.total = int(state.get("bad_updates_total", 0))

    @property
    def checkpoints(self) -> CheckpointManager | None:
        return None if self.out_dir is None else CheckpointManager(self.out_dir / "checkpoints",
                                                                   keep=self.keep_checkpoints)

    def write_checkpoint(self) -> Path:
        if self.checkpoints is None:
            raise ValueError("write_checkpoint needs out_dir")
        return self.checkpoints.save(self.iteration, self.save_checkpoint, self._trainer_state(),
                                     processes=self.processes)

    def resume(self) -> bool:
        """Load the newest valid checkpoint of out_dir (if any). Returns whether one was found."""
        found = None if self.checkpoints is None else self.checkpoints.latest()
        if found is None:
            return False
        path, state = found
        self.load_checkpoint(path)
        self._restore_trainer_state(state)
        return True

    def train(self, num_iterations: int | None = None, *, resume: bool = False,
              progress: bool = True, on_iteration: Callable[[dict], None] | None = None) -> list[dict]:
        """Run PPO until `num_iterations` (default config.num_iterations) iterations are done in
        total, logging to out_dir/metrics.jsonl and checkpointing every `checkpoint_every`
        iterations and at the end. SIGTERM/SIGINT finish the current iteration, checkpoint and
        return. With resume=True, continue from the newest valid checkpoint."""
        total = self.config.num_iterations if num_iterations is None else int(num_iterations)
        if resume:
            self.resume()
        writer, main = None, self.processes.is_main
        if self.out_dir is not None and main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(self.config.to_json())
            writer = loop.MetricsWriter(self.out_dir / "metrics.jsonl",
                                        truncate_after=self.iteration - 1)
        bar = _progress(total, self.iteration, progress and main, f"PPO ({self.backend})")
        try:
            with loop.StopRequested() as stop:
                while self.iteration < total:
                    stats = self.step()
                    if writer is not None:
                        writer.write(stats)
                    if on_iteration is not None:
                        on_iteration(stats)
                    bar.update(1)
                    bar.set_postfix({"score": f"{stats['objective/scores']:.3f}",
                                     "kl": f"{stats['objective/kl']:.3f}"}, refresh=False)
                    every = self.checkpoint_every
                    stopping = self.processes.any(stop.requested is not None)  # all agree
                    if self.out_dir is not None and ((every and self.iteration % every == 0)
                                                     or stopping or self.iteration == total):
                        self.write_checkpoint()
                    if stopping:
                        if main:
                            print(f"\n{stop.requested or 'a stop request'}: stopped after iteration "
                                  f"{self.iteration}; checkpoint written, resume with --resume",
                                  file=sys.stderr)
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return self.history

    def _save_tokenizer(self, path: str | os.PathLike) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)
