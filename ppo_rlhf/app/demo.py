"""`ppo-rlhf demo`: the whole RLHF loop on a built-in task (default `reviews`), all six seed steps, offline.

  1. pretrained LM      a small GPT-2-style model pretrained here on the task's template corpus
  2. reward definition  the task's gold reward (positive sentiment AND well-formed text) stands
                        for human judgement; it is never shown to PPO
  3. human feedback     the synthetic labeller (Bradley-Terry noise around gold) labels pairs of
                        the pretrained policy's own samples (plus corpus pairs)
  4. reward model       trained on those preferences (Bradley-Terry), normalised to mean 0 / std 1
  5. PPO                the policy is fine-tuned against the reward model, KL-penalised to the
                        pretrained policy; gold is logged alongside (never trained on)
  6. evaluation         reward-model score and gold score before and after, KL to the reference,
                        win-rate against the reference, samples, plots and a report

On a task with a verifiable reward (`Task.verifiable`, e.g. `--task arithmetic`: exact-match
scoring) steps 3 and 4 are skipped: PPO (or the critic-free estimator of `--estimator`) trains on
the task's checker directly, and the evaluation reports its mean, the accuracy, before and after.

The run directory (default runs/demo-<backend>, runs/demo-<task>-<backend> for another task):
  sft/  feedback.jsonl  reward_model/  ppo/ (config.json, metrics.jsonl, checkpoints/, policy/)
  samples_before.jsonl  samples_after.jsonl  plots/*.png  report.md  summary.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppo_rlhf.app.backends import BACKENDS, check_backend, get_backend
from ppo_rlhf.errors import UsageError
from ppo_rlhf.feedback.labeller import SYNTHETIC_LABELS

ARITHMETIC_PRETRAIN_STEPS = 250


DEMO_LORA_TARGETS = "q,k,v,o,up,down"
"""`ppo-rlhf demo --lora-rank`'s default targets: every projection of the demo's GPT-2 model."""
LORA_LR_FACTOR = 10.0
"""`ppo-rlhf demo --lora-rank`: PPO's learning rate is this times the full fine-tune's, unless
--learning-rate is given (`DemoConfig.with_lora`)."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each step. The defaults run the whole loop in well under 15 minutes per backend on
    a 2-core CPU; `quick()` is a smoke-test version (about a minute)."""

    task: str = "reviews"
    seed: int = 0
    model_size: str = "small"            # demo_model_config size of the policy
    pretrain_steps: int = 600
    corpus_size: int = 20000
    feedback_prompts: int = 1500         # policy-sample pairs labelled by the synthetic labeller
    corpus_pairs: int = 1500             # plus this many corpus pairs (task.preference_data)
    labeller_temperature: float = 0.2
    rm_epochs: int = 2
    rm_lr: float = 3e-4
    ppo_iterations: int = 120
    ppo: dict = dataclasses.field(default_factory=lambda: dict(
        batch_size=32, max_new_tokens=24, max_prompt_len=8, ppo_epochs=4, num_minibatches=2,
        learning_rate=3e-5, kl_coef=0.2, temperature=1.0, missing_eos_penalty=1.0, scan_unroll=True))
    # kl_coef: at 0.05 (TRL's default) PPO finds the reward model's blind spot within ~20
    # iterations ("love it.." scores +3.5 on the RM and -1 on gold); 0.2 keeps the KL near 2-3
    # nats and gold rises instead. `ppo-rlhf demo --kl-coef 0.05` shows the hack.
    # scan_unroll: JAX runs the demo's 4 layers unrolled, not as a loop (PPOConfig.scan_unroll;
    # torch: no effect): faster PPO iterations at these shallow shapes (benchmarks/README.md).
    supervised_remat: dict = dataclasses.field(default_factory=lambda: {"jax": "full", "torch": "none"})
    # SFTConfig.remat / RMConfig.remat of the pretraining and reward-model stages, per backend:
    # the faster for each at these shapes on CPU (same gradients up to float32 rounding).
    # `python -m benchmarks.supervised_step` (the demo's pretraining step, 32 x 32 tokens):
    # without remat, XLA:CPU's scratch buffer for the JAX step is 96 MB, above glibc's 64 MiB
    # per-thread heap, so it is mmapped and page-faulted afresh at every step (23k faults,
    # half the step); "full" shrinks it to 25 MB and the step from 90 to 66 ms. torch reuses
    # its memory, and recomputing the layers costs it 58 -> 87 ms.
    eval_prompts: int = 96               # held-out prompts for before/after evaluation
    pretrained: str | None = None        # a model dir (e.g. an earlier run's sft/): skip pretraining
    sample_temperature: float = 1.0      # evaluation samples at the PPO sampling temperature

    @classmethod
    def for_task(cls, task: str, *, quick: bool = False) -> "DemoConfig":
        """The demo's sizes for `task`: the defaults above (or `quick()`) for reviews; for
        arithmetic, its own (sequences of at most 8 tokens: fewer pretraining steps, 400 evaluation
        samples, RL on the checker at a higher learning rate and a lower KL coefficient); for any
        other task, the defaults with the task's prompt and response lengths."""
        base = cls.quick() if quick else cls()
        if task == "reviews":
            return base
        if task == "arithmetic":
            ppo = dict(max_new_tokens=4, max_prompt_len=6, temperature=1.0, missing_eos_penalty=1.0,
                       scan_unroll=True)
            if quick:
                return dataclasses.replace(base, task=task, ppo=dict(
                    ppo, batch_size=8, ppo_epochs=2, num_minibatches=2, learning_rate=1e-4, kl_coef=0.05))
            return dataclasses.replace(
                base, task=task, pretrain_steps=ARITHMETIC_PRETRAIN_STEPS, ppo_iterations=60, eval_prompts=400,
                ppo=dict(ppo, batch_size=32, ppo_epochs=4, num_minibatches=2, learning_rate=1e-4, kl_coef=0.05))
        from ppo_rlhf.tasks import get_task

        t = get_task(task)
        return dataclasses.replace(base, task=task, ppo=dict(base.ppo, max_new_tokens=t.max_response_tokens,
                                                             max_prompt_len=t.max_prompt_tokens))

    def with_estimator(self, estimator: str, num_generations: int | None = None) -> "DemoConfig":
        """This config with PPO's `advantage_estimator` set. A group estimator (and
        reinforce_pp_baseline) samples `num_generations` responses per prompt (default 4); the
        responses per iteration stay `ppo["batch_size"]`, so the prompts per iteration are
        batch_size // num_generations."""
        from ppo_rlhf.config import ADVANTAGE_ESTIMATORS, GROUP_ADVANTAGE_KINDS

        if estimator not in ADVANTAGE_ESTIMATORS:
            raise UsageError(f"--estimator {estimator!r}: choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
        grouped = estimator in GROUP_ADVANTAGE_KINDS + ("reinforce_pp_baseline",)
        g = num_generations if num_generations is not None else (4 if grouped else 1)
        if g < 1:
            raise UsageError(f"--num-generations {g}: must be >= 1")
        responses = self.ppo["batch_size"]
        if responses % g:
            raise UsageError(f"--num-generations {g} must divide the demo's {responses} responses per iteration")
        return dataclasses.replace(self, ppo={**self.ppo, "advantage_estimator": estimator,
                                              "num_generations": g, "batch_size": responses // g})

    def with_lora(self, rank: int, alpha: float | None = None, targets: str | None = None,
                  learning_rate: float | None = None) -> "DemoConfig":
        """This config with LoRA on the policy (`PPOConfig.lora_rank`): rank-`rank` adapters on
        `targets` (default: every projection of the GPT-2 model, q,k,v,o,up,down), alpha default
        2 x rank, and PPO's learning rate 10 x the full fine-tune's unless given
        (`LORA_LR_FACTOR`: the adapters start at B = 0 and move the model through a rank-r
        product, so the full fine-tune's step size barely moves them; peers' LoRA recipes use
        about 10x). The reward model and the critic are trained in full, as without LoRA."""
        ppo = {**self.ppo, "lora_rank": rank, "lora_alpha": float(alpha if alpha is not None else 2 * rank),
               "lora_targets": targets or DEMO_LORA_TARGETS, "lora_roles": ("policy",),
               "learning_rate": (learning_rate if learning_rate is not None
                                 else self.ppo["learning_rate"] * LORA_LR_FACTOR)}
        return dataclasses.replace(self, ppo=ppo)

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(model_size="tiny", pretrain_steps=60, corpus_size=2000, feedback_prompts=96,
                   corpus_pairs=96, rm_epochs=1, ppo_iterations=3, eval_prompts=16,
                   ppo=dict(batch_size=8, max_new_tokens=24, max_prompt_len=8, ppo_epochs=2,
                            num_minibatches=2, learning_rate=1e-4, kl_coef=0.05, temperature=1.0,
                            missing_eos_penalty=1.0, scan_unroll=True))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(backend: str, out: str | os.PathLike, config: DemoConfig = DemoConfig(), *,
             progress: bool = True) -> dict[str, Any]:
    """Run the six steps; returns summary.json's contents."""
    from ppo_rlhf.app.backends import load_policy_sampler
    from ppo_rlhf.app.evaluate import evaluate
    from ppo_rlhf.app.pipelines import pretrain_model
    from ppo_rlhf.config import PPOConfig
    from ppo_rlhf.eval.policy import write_samples
    from ppo_rlhf.feedback.labeller import SyntheticLabeller
    from ppo_rlhf.tasks import get_task

    check_backend(backend)
    try:  # checked now, not after minutes of pretraining
        ppo_config = PPOConfig(**{**config.ppo, "num_iterations": config.ppo_iterations,
                                  "seed": config.seed})
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    (out / "demo_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))

    # 1. a pretrained LM ----------------------------------------------------------------------
    t = time.perf_counter()
    if config.pretrained is not None:  # step 1 done before: start every run from the same model
        sft = Path(config.pretrained)
        if not (sft / "config.json").is_file():
            raise UsageError(f"--pretrained {config.pretrained!r} is not a model directory")
        _say(f"1/6 the pretrained model of {sft} (not pretrained again)")
        sft_metrics: dict[str, Any] = {}
    else:
        sft = out / "sft"
        _say(f"1/6 pretraining a {config.model_size} GPT-2-style model on the {task.name} corpus ({backend})")
        sft_metrics = pretrain_model(backend, sft, task=task,
                                     config={"num_steps": config.pretrain_steps, "seed": config.seed,
                                             "remat": config.supervised_remat.get(backend, "none")},
                                     model_size=config.model_size, corpus_size=config.corpus_size,
                                     eval_samples=0, progress=progress)
    times["pretrain_s"] = time.perf_counter() - t

    # 2. the reward definition: the task's gold reward, the stand-in for human judgement -------
    _say(f"2/6 reward definition: {task.description}")
    if task.verifiable:
        return _run_verifiable(backend, out, config, task, ppo_config, sft, sft_metrics, times, t_start, progress)

    # 3. feedback on the policy's own samples, from the synthetic labeller ----------------------
    t = time.perf_counter()
    _say(f"3/6 collecting feedback: {config.feedback_prompts} pairs of policy samples + "
         f"{config.corpus_pairs} corpus pairs, labelled with Bradley-Terry noise (T={config.labeller_temperature})")
    sampler = load_policy_sampler(backend, sft, max_new_tokens=config.ppo["max_new_tokens"],
                                  temperature=config.sample_temperature, seed=config.seed)
    train_prompts = task.train_prompts()
    prompts = [train_prompts[i % len(train_prompts)] for i in range(config.feedback_prompts)]
    pairs = sampler.sample(prompts, 2)
    labeller = SyntheticLabeller(task.gold_reward, temperature=config.labeller_temperature, seed=config.seed)
    labelled = labeller.label_pairs(prompts, [p[0] for p in pairs], [p[1] for p in pairs])
    records = list(labelled.records)
    if config.corpus_pairs:
        records += list(task.preference_data(config.corpus_pairs, seed=config.seed + 1,
                                             temperature=config.labeller_temperature).records)
    from ppo_rlhf.data import write_records

    write_records(out / "feedback.jsonl", records)
    times["feedback_s"] = time.perf_counter() - t

    # 4. the reward model ------------------------------------------------------------------------
    t = time.perf_counter()
    _say(f"4/6 training the reward model on {len(records)} preferences")
    rm_metrics = _train_reward_model(backend, sft, records, out / "reward_model", config,
                                     task.max_prompt_tokens + task.max_response_tokens + 2, progress)
    times["reward_model_s"] = time.perf_counter() - t
    _say(f"    held-out accuracy {rm_metrics['eval_accuracy']:.3f} (labeller noise ceiling "
         f"{rm_metrics.get('noise_ceiling', float('nan')):.3f})")

    # 6a. evaluation before PPO -------------------------------------------------------------------
    eval_prompts = [task.eval_prompts()[i % len(task.eval_prompts())] for i in range(config.eval_prompts)]
    ev = dict(reward_model=str(out / "reward_model"), gold=task.gold_reward,
              max_prompt_len=config.ppo["max_prompt_len"], max_new_tokens=config.ppo["max_new_tokens"],
              temperature=config.sample_temperature, batch_size=config.ppo["batch_size"], seed=config.seed + 7)
    before, before_records = evaluate(backend, sft, eval_prompts, reference=sft, **ev)
    write_samples(out / "samples_before.jsonl", before_records)

    # 5. PPO against the reward model --------------------------------------------------------------
    _say(f"5/6 PPO: {config.ppo_iterations} iterations against the reward model (gold logged, not trained on)")
    history, after, after_records, plots = _rl_then_evaluate(
        backend, out, config, task, ppo_config, sft, str(out / "reward_model"), train_prompts, eval_prompts,
        ev, times, progress)
    summary = {
        "backend": backend,
        "gold_score_before": before.gold_score, "gold_score_after": after.gold_score,
        "rm_score_before": before.rm_score, "rm_score_after": after.rm_score,
        "kl_to_ref": after.kl_to_ref, "win_rate_vs_reference": after.win_rate,
        "eos_frac_after": after.eos_frac, "response_len_after": after.response_len_mean,
        "rm_eval_accuracy": rm_metrics["eval_accuracy"], "rm_noise_ceiling": rm_metrics.get("noise_ceiling"),
        "pretrain_final_loss": sft_metrics.get("final_loss"),
        "ppo_iterations": len(history), "lora_rank": ppo_config.lora_rank,
        "learning_rate": ppo_config.learning_rate, "times_s": times,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_report(summary, before, after, before_records, after_records,
                                           plots, out, config))
    _say(f"gold {before.gold_score:+.3f} -> {after.gold_score:+.3f}, RM {before.rm_score:+.3f} -> "
         f"{after.rm_score:+.3f}, KL {after.kl_to_ref:.2f}, win-rate {after.win_rate:.2f}; "
         f"{summary['wall_seconds']:.0f} s; report: {out / 'report.md'}")
    return summary



def _rl_then_evaluate(backend: str, out: Path, config: DemoConfig, task: Any, ppo_config: Any, sft: Path,
                      reward: Any, train_prompts: list[str], eval_prompts: list[str], ev: dict,
                      times: dict[str, float], progress: bool) -> tuple[list, Any, list, Any]:
    """Steps 5 and 6 of both paths: RL from `sft` against `reward` (the gold reward logged
    beside it, never trained on unless it is the reward), the policy saved, then evaluated and the
    metrics plotted. Returns (history, evaluation after, its samples, plots)."""
    from ppo_rlhf.app.evaluate import evaluate
    from ppo_rlhf.eval.plots import plot_metrics
    from ppo_rlhf.eval.policy import write_samples

    t = time.perf_counter()
    trainer = get_backend(backend).PPOTrainer(str(sft), reward, train_prompts, config=ppo_config,
                                              out_dir=out / "ppo", extra_rewards={"gold": task.gold_reward},
                                              checkpoint_every=max(1, config.ppo_iterations // 4))
    history = trainer.train(progress=progress)
    policy_dir = out / "ppo" / "policy"
    trainer.save_policy(policy_dir)
    times["ppo_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _say("6/6 evaluating before/after, plotting, writing the report")
    after, after_records = evaluate(backend, policy_dir, eval_prompts, reference=sft, **ev)
    write_samples(out / "samples_after.jsonl", after_records)
    plots = plot_metrics(history, out / "plots")
    times["eval_s"] = time.perf_counter() - t
    return history, after, after_records, plots


def _run_verifiable(backend: str, out: Path, config: DemoConfig, task: Any, ppo_config: Any, sft: Path,
                    sft_metrics: dict, times: dict[str, float], t_start: float, progress: bool) -> dict[str, Any]:
    """Steps 3-6 on a task whose gold reward is a checker: no feedback and no reward model; RL
    trains on the checker itself and the evaluation reports its mean (the accuracy)."""
    from ppo_rlhf.app.evaluate import evaluate
    from ppo_rlhf.eval.policy import write_samples

    estimator = ppo_config.advantage_estimator
    _say("3/6, 4/6 skipped: the reward is verifiable (checked, not learned): no feedback, no reward model")
    eval_prompts = [task.eval_prompts()[i % len(task.eval_prompts())] for i in range(config.eval_prompts)]
    ev = dict(gold=task.gold_reward, max_prompt_len=config.ppo["max_prompt_len"],
              max_new_tokens=config.ppo["max_new_tokens"], temperature=config.sample_temperature,
              batch_size=ppo_config.rollout_size, seed=config.seed + 7)
    before, before_records = evaluate(backend, sft, eval_prompts, reference=sft, **ev)
    write_samples(out / "samples_before.jsonl", before_records)

    _say(f"5/6 RL ({estimator}, {ppo_config.num_generations} per prompt): {config.ppo_iterations} iterations "
         f"against the task's checker")
    history, after, after_records, plots = _rl_then_evaluate(
        backend, out, config, task, ppo_config, sft, task.gold_reward, task.train_prompts(), eval_prompts,
        ev, times, progress)
    summary = {
        "backend": backend, "task": task.name,
        "reward": "verifiable: the task's checker, trained on directly (no feedback, no reward model)",
        "pretrained_model": str(sft), "advantage_estimator": estimator,
        "num_generations": ppo_config.num_generations,
        "accuracy_before": before.gold_score, "accuracy_after": after.gold_score,
        "gold_score_before": before.gold_score, "gold_score_after": after.gold_score,
        "eval_samples": len(eval_prompts), "kl_to_ref": after.kl_to_ref,
        "eos_frac_after": after.eos_frac, "response_len_after": after.response_len_mean,
        "pretrain_final_loss": sft_metrics.get("final_loss"),
        "ppo_iterations": len(history), "responses_seen": len(history) * ppo_config.rollout_size,
        "times_s": times, "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_verifiable_report(summary, before, after, before_records, after_records,
                                                      plots, out))
    _say(f"accuracy {before.gold_score:.3f} -> {after.gold_score:.3f} on {len(eval_prompts)} eval samples, "
         f"KL {after.kl_to_ref:.2f}; {summary['wall_seconds']:.0f} s; report: {out / 'report.md'}")
    return summary


def _verifiable_report(s: dict, before: Any, after: Any, before_records: list, after_records: list,
                       plots: list, out: Path) -> str:
    lines = [
        f"# RL demo ({s['backend']}) on the `{s['task']}` task: a verifiable reward", "",
        f"The reward is the task's checker (exact match, 0 or 1), trained on directly: no feedback, "
        f"no reward model. Estimator `{s['advantage_estimator']}`, {s['num_generations']} response(s) per "
        f"prompt, {s['ppo_iterations']} iterations ({s['responses_seen']} responses).", "",
        f"Wall time {s['wall_seconds']:.0f} s ("
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in s["times_s"].items()) + ").", "",
        "| | before RL (pretrained) | after RL |", "|---|---|---|",
        f"| accuracy on the eval prompts ({s['eval_samples']} samples) | {before.gold_score:.3f} | "
        f"{after.gold_score:.3f} |",
        f"| KL to the reference (per response) | {before.kl_to_ref:.3f} | {after.kl_to_ref:.3f} |",
        f"| responses ending with EOS | {before.eos_frac:.2f} | {after.eos_frac:.2f} |",
        f"| mean response length (tokens) | {before.response_len_mean:.1f} | {after.response_len_mean:.1f} |",
        "", "## Training curves", "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in plots if p.name != "training.png"]
    lines += ["", "## Samples (same prompts, before -> after)", ""]
    for b, a in list(zip(before_records, after_records))[:8]:
        lines.append(f"- **{b['prompt']}** before {b['response']!r} ({b.get('gold_score', 0):.0f}), "
                     f"after {a['response']!r} ({a.get('gold_score', 0):.0f})")
    return "\n".join(lines) + "\n"


def _train_reward_model(backend: str, sft: Path, records: list, out: Path, config: DemoConfig,
                        max_length: int, progress: bool) -> dict[str, Any]:
    from ppo_rlhf.config import RMConfig
    from ppo_rlhf.runtime.split import group_key, grouped_holdout_split

    rm = get_backend(backend)
    cfg = RMConfig(num_epochs=config.rm_epochs, learning_rate=config.rm_lr, seed=config.seed,
                   max_length=max_length, remat=config.supervised_remat.get(backend, "none"))
    train_idx, eval_idx, _ = grouped_holdout_split([group_key(r) for r in records], cfg.eval_fraction,
                                                   cfg.seed)  # by prompt: none on both sides
    trainer = rm.RewardModelTrainer(str(sft), cfg, out_dir=out)
    return trainer.fit([records[i] for i in train_idx], [records[i] for i in eval_idx], progress=progress,
                       label_quality=SYNTHETIC_LABELS)


def _report(s: dict, before: Any, after: Any, before_records: list, after_records: list,
            plots: list, out: Path, config: DemoConfig) -> str:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:+.3f}"

    lines = [
        f"# RLHF demo ({s['backend']}) on the `{config.task}` task", "",
        f"Wall time {s['wall_seconds']:.0f} s ("
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in s["times_s"].items()) + ").", "",
        *([f"PPO trained rank-{s['lora_rank']} LoRA adapters on the policy (learning rate "
           f"{s['learning_rate']:g}); its base weights stayed frozen.", ""] if s.get("lora_rank") else []),
        "| | before PPO (pretrained) | after PPO |", "|---|---|---|",
        f"| gold score (stand-in for humans) | {f(before.gold_score)} | {f(after.gold_score)} |",
        f"| reward-model score | {f(before.rm_score)} | {f(after.rm_score)} |",
        f"| KL to the reference (per response) | {before.kl_to_ref:.3f} | {after.kl_to_ref:.3f} |",
        f"| win-rate vs reference (judged by the RM) | {before.win_rate:.2f} | {after.win_rate:.2f} |",
        f"| responses ending with EOS | {before.eos_frac:.2f} | {after.eos_frac:.2f} |",
        f"| mean response length (tokens) | {before.response_len_mean:.1f} | {after.response_len_mean:.1f} |",
        "",
        f"Reward model: held-out pairwise accuracy {s['rm_eval_accuracy']:.3f}; the synthetic labeller's "
        f"noise ceiling on the same pairs is {s['rm_noise_ceiling']:.3f}." if s.get("rm_noise_ceiling")
        else f"Reward model: held-out pairwise accuracy {s['rm_eval_accuracy']:.3f}.", "",
        "If the reward-model score rises much more than the gold score, PPO is exploiting the reward "
        "model's errors (over-optimisation); the KL penalty is what keeps that in check.", "",
        "## Training curves", "",
    ]
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in plots if p.name != "training.png"]
    lines += ["", "## Samples (same prompts, before -> after)", ""]
    for b, a in list(zip(before_records, after_records))[:8]:
        lines.append(f"- **{b['prompt']}**")
        for when, r in (("before", b), ("after ", a)):
            lines.append(f"  - {when} (gold {r.get('gold_score', 0):+.2f}, RM {r.get('rm_score', 0):+.2f}): "
                         f"{r['response']}")
    return "\n".join(lines) + "\n"


# ---- CLI -------------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole RLHF loop on the built-in task (offline)",
                       description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1])
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--task", default="reviews",
                   help="the task (default reviews; arithmetic: a verifiable reward, RL on the checker "
                        "without a reward model)")
    p.add_argument("--estimator", metavar="NAME",
                   help="PPOConfig.advantage_estimator: gae (PPO, the default), grpo, dr_grpo, rloo, "
                        "reinforce_pp, reinforce_pp_baseline")
    p.add_argument("--num-generations", type=int, metavar="G",
                   help="responses per prompt (default 4 with a group estimator, else 1); the responses "
                        "per iteration stay the same, the prompts per iteration are divided by G")
    p.add_argument("--pretrained", metavar="DIR",
                   help="start from this pretrained model (e.g. an earlier demo run's sft/) instead of "
                        "pretraining one: runs that compare estimators start from the same model")
    p.add_argument("--out", help="run directory (default: runs/demo-<backend>, or runs/demo-<task>-<backend>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppo-iterations", type=int, help="override the number of PPO iterations")
    p.add_argument("--kl-coef", type=float,
                   help="override the KL coefficient (default 0.2 on reviews, where 0.05 shows reward "
                        "hacking; 0.05 on arithmetic)")
    p.add_argument("--learning-rate", type=float, metavar="LR",
                   help="override PPO's learning rate (default 3e-5 on reviews; with --lora-rank "
                        f"{LORA_LR_FACTOR:g}x that)")
    g = p.add_argument_group("LoRA on the policy (only its adapters are trained; the reference is "
                             "the policy with its adapters off)")
    g.add_argument("--lora-rank", type=int, metavar="R", help="rank-R adapters (default: no LoRA)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="the adapters' scale A / R (default 2R)")
    g.add_argument("--lora-targets", metavar="q,v,...",
                   help=f"the projections that get adapters (default {DEMO_LORA_TARGETS})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    config = DemoConfig.for_task(args.task, quick=args.quick)
    config = dataclasses.replace(config, seed=args.seed, pretrained=args.pretrained)
    if args.estimator is not None or args.num_generations is not None:
        config = config.with_estimator(args.estimator or "gae", args.num_generations)
    if args.ppo_iterations is not None:
        if args.ppo_iterations < 1:
            raise UsageError("--ppo-iterations must be >= 1")
        config = dataclasses.replace(config, ppo_iterations=args.ppo_iterations)
    if args.kl_coef is not None:
        config = dataclasses.replace(config, ppo={**config.ppo, "kl_coef": args.kl_coef})
    if args.lora_rank is not None:
        config = config.with_lora(args.lora_rank, args.lora_alpha, args.lora_targets, args.learning_rate)
    elif args.lora_alpha is not None or args.lora_targets is not None:
        raise UsageError("--lora-alpha / --lora-targets need --lora-rank")
    elif args.learning_rate is not None:
        config = dataclasses.replace(config, ppo={**config.ppo, "learning_rate": args.learning_rate})
    default_out = f"runs/demo-{args.backend}" if args.task == "reviews" else f"runs/demo-{args.task}-{args.backend}"
    out = Path(args.out or default_out)
    if (out / "summary.json").exists():
        raise UsageError(f"{out} holds a finished demo run; choose another --out or delete it")
    summary = run_demo(args.backend, out, config, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "times_s"}, indent=2))
    return 0
