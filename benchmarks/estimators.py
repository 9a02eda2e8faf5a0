"""PPO vs the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, REINFORCE++-baseline)
on the demo's reviews task, in both backends (issue 31, item 7).

    python -m benchmarks.estimators                                  # the full run (resumable)
    python -m benchmarks.estimators --time-budget 3600               # at most ~1 h of it now
    python -m benchmarks.estimators --only-report                    # outputs from what is cached
    python -m benchmarks.estimators --quick --out /tmp/est/est.json  # smoke test
    python -m benchmarks.estimators --backends jax --estimators gae,grpo --seeds 1 --time-budget 1800

The study. Every run starts from the same pretrained demo policy and optimises the same objective
-- the score of the demo's trained proxy reward model minus `kl_coef` x the per-response KL to the
initial policy, shaped into the reward (`kl_coef` 0.05, no KL term in the loss) -- with the same
optimiser, learning rate, epochs and minibatches; only `advantage_estimator` differs. The
pretrained policy and the proxy are `benchmarks.overoptimization`'s (`pretrained`, `proxy_model`:
the same cache keys, so a cache directory shared with that study is reused; default: its cache).

Why the proxy, not the gold reward. This is RLHF: the policy is trained on a learned reward and
judged by the gold reward it only imitates, so "gold vs KL" measures what each estimator gets out
of the proxy per unit of drift, over-optimisation included; and the wall time includes scoring
with a reward model (and, for PPO, training a critic initialised from it), as in real use. A
task whose reward is a checker (`Task.verifiable`) trains on the checker instead (`--task
arithmetic`, with the demo's settings for that task: `Study.for_task`; outputs
`results/estimators-arithmetic.*`).

Equal samples. Every estimator samples the same number S of responses per iteration (`--samples`,
default 32) -- PPO and REINFORCE++ (no group baseline) S prompts x 1 response; the group
estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) S / G prompts x G responses
(`--num-generations` G, default 4) -- so "samples seen" = iterations x S is the same x-axis
for all, and each iteration makes the same number of optimiser steps (`num_minibatches` splits
the S responses).

Each evaluation point (before the first iteration and every `--eval-every`) samples one response
per held-out prompt at the training temperature (`benchmarks.rl_common.Evaluator`, as the
over-optimisation study) and records gold (mean gold reward), proxy (mean proxy score), kl (mean
per-response KL(pi || pi_init), nats), samples (responses trained on so far) and train_s (wall
seconds spent in `trainer.step` so far: generation, scoring, update -- evaluation excluded; JAX's
compilation falls in the first step, which is counted as a median step: steady-state time; the
measured first step and the raw cumulative time are kept as first_step_s / train_s_raw; JAX runs
use the CLI's persistent compilation cache). Each finished (estimator, backend, seed) run is written
atomically to `--cache-dir/estimator-runs/<config hash>/`; a rerun skips finished runs.

Outputs: `--out` (JSON: per estimator and backend, the runs and the seed mean +- std at every
evaluation point, and the table's numbers), a markdown table next to it (every estimator and
backend run, ranked within its backend by final gold, with its difference from PPO's), and
`<out>.png` (gold vs KL, gold vs wall time and gold vs samples, one column per backend).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import overoptimization as oo
from benchmarks.rl_common import Evaluator, config_hash, mean_std, write_atomic

HERE = Path(__file__).resolve().parent
BACKENDS = ("jax", "torch")
ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # a group baseline: G responses per prompt
TASKS = ("reviews",)  # and any task with Task.verifiable (e.g. `arithmetic`): `setup_task`
DEFAULT_OUT = HERE / "results" / "estimators.json"
DEFAULT_CACHE = oo.DEFAULT_CACHE  # the pretrained policy and proxies are shared with that study
LABELS = {"gae": "PPO (GAE + critic)", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO",
          "reinforce_pp": "REINFORCE++", "reinforce_pp_baseline": "REINFORCE++-baseline"}


def _say(msg: str) -> None:
    print(f"[estimators] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Study:
    """Every number that shapes the results (the cache keys hash these)."""

    task: str = "reviews"
    estimators: tuple[str, ...] = ESTIMATORS
    backends: tuple[str, ...] = BACKENDS
    seeds: tuple[int, ...] = (0, 1, 2)
    # the starting checkpoints: benchmarks.overoptimization's (its other proxy settings)
    model_size: str = "small"
    pretrain_steps: int = 600
    rm_pairs: int = 4000
    # the RL runs
    samples: int = 32                  # responses per iteration, every estimator
    num_generations: int = 4           # G of the group estimators
    iterations: int = 100
    eval_every: int = 5
    eval_prompts: int = 96
    kl_coef: float = 0.05              # KL-shaped reward, the same objective for every estimator
    kl_loss_coef: float = 0.0
    ppo: dict = field(default_factory=lambda: dict(
        max_new_tokens=24, max_prompt_len=8, ppo_epochs=4, num_minibatches=2, learning_rate=1e-5,
        temperature=1.0, missing_eos_penalty=1.0))

    @classmethod
    def quick(cls) -> "Study":
        return cls(seeds=(0,), model_size="tiny", pretrain_steps=20, rm_pairs=32, samples=8,
                   num_generations=2, iterations=2, eval_every=2, eval_prompts=8,
                   ppo=dict(max_new_tokens=12, max_prompt_len=8, ppo_epochs=1, num_minibatches=2,
                            learning_rate=1e-4, temperature=1.0, missing_eos_penalty=1.0))

    @classmethod
    def for_task(cls, task: str) -> "Study":
        """The defaults for `task`: the above for reviews; for a verifiable task the demo's own
        settings (`DemoConfig.for_task`: pretraining steps, learning rate, KL coefficient, epochs,
        lengths), run longer (300 iterations, the task README's longest runs) and evaluated on
        400 samples (each held-out prompt many times), as the demo evaluates it."""
        if task == "reviews":
            return cls()
        from ppo_rlhf.app.demo import DemoConfig

        demo = DemoConfig.for_task(task)
        ppo = {k: v for k, v in demo.ppo.items() if k not in ("batch_size", "kl_coef")}
        return cls(task=task, pretrain_steps=demo.pretrain_steps, kl_coef=demo.ppo["kl_coef"], iterations=300,
                   eval_every=20, eval_prompts=demo.eval_prompts, ppo=ppo)

    def overopt(self) -> oo.Study:
        """The over-optimisation study whose checkpoints these runs start from."""
        return oo.Study(model_size=self.model_size, pretrain_steps=self.pretrain_steps, rm_pairs=(self.rm_pairs,))

    def generations(self, estimator: str) -> int:
        return self.num_generations if estimator in GROUPED else 1

    def config(self, estimator: str, seed: int) -> dict[str, Any]:
        """The PPOConfig of one run: S / G prompts x G responses (G = 1 without a group baseline)."""
        g = self.generations(estimator)
        return dict(self.ppo, batch_size=self.samples // g, num_generations=g, advantage_estimator=estimator,
                    kl_coef=self.kl_coef, kl_loss_coef=self.kl_loss_coef, num_iterations=self.iterations,
                    seed=seed)

    def runs(self) -> list[tuple[str, str, int]]:
        """(estimator, backend, seed), seed by seed: a partial run holds whole seeds."""
        return [(e, b, s) for s in self.seeds for e in self.estimators for b in self.backends]

    def run_key(self) -> str:
        o = self.overopt()
        spec = (self.task, o.policy_key(), o.proxy_key(self.rm_pairs), self.samples, self.num_generations,
                self.iterations, self.eval_every, self.eval_prompts, self.kl_coef, self.kl_loss_coef,
                sorted(self.ppo.items()))
        return config_hash(spec)


def default_out(task: str) -> Path:
    """results/estimators.json for reviews, results/estimators-<task>.json for another task."""
    return DEFAULT_OUT if task == "reviews" else DEFAULT_OUT.with_name(f"estimators-{task}.json")


def run_name(estimator: str, backend: str, seed: int) -> str:
    return f"{estimator}-{backend}-seed{seed}"


# ---- the task: starting policy, reward, prompts, gold ---------------------------------------------
@dataclass
class TaskSetup:
    policy: Path                        # the initial policy (and the KL reference)
    reward: Any                         # a reward-model path, or a callable (a verifiable task)
    proxy: Path | None                  # the model scored at evaluation (None: a checker)
    train_prompts: list[str]
    eval_prompts: list[str]
    gold: Callable[[list[str], list[str]], list[float]]
    metric: str                         # what "gold" means in the outputs
    info: dict[str, Any]


def setup_task(study: Study, cache: Path, progress: bool) -> TaskSetup:
    """`--task` hook. reviews: the over-optimisation study's pretrained policy and proxy reward
    model (trained once, cached), gold = the task's gold reward. A verifiable task
    (`Task.verifiable`, e.g. `arithmetic`): its demo policy pretrained once in JAX on
    its corpus (`oo.pretrained(task=...)`), RL on the checker itself (the trainer takes a
    callable reward; no proxy: the evaluator scores KL only), gold = the checker's mean, i.e. the
    accuracy, against samples seen."""
    from ppo_rlhf.tasks import get_task

    task = get_task(study.task)
    o = study.overopt()
    ev = task.eval_prompts()
    eval_prompts = [ev[i % len(ev)] for i in range(study.eval_prompts)]
    if getattr(task, "verifiable", False):
        policy, pm = oo.pretrained(o, cache, progress, task=task.name)
        return TaskSetup(policy=policy, reward=task.gold_reward, proxy=None, train_prompts=task.train_prompts(),
                         eval_prompts=eval_prompts, gold=task.gold_reward, metric="accuracy",
                         info={"policy": policy.name, "pretrain_s": pm.get("wall_s"),
                               "reward": "the task's checker (verifiable), trained on directly"})
    if task.name != "reviews":
        raise SystemExit(f"--task {study.task}: a task with a learned reward other than reviews is not wired "
                         f"(its proxy would need the over-optimisation study's reward-model step)")
    policy, pm = oo.pretrained(o, cache, progress)
    proxy, rm = oo.proxy_model(o, study.rm_pairs, policy, cache, progress)
    return TaskSetup(policy=policy, reward=proxy, proxy=proxy, train_prompts=task.train_prompts(),
                     eval_prompts=eval_prompts, gold=task.gold_reward, metric="gold reward (in [-1, 1])",
                     info={"policy": policy.name, "proxy": proxy.name, "pretrain_s": pm.get("wall_s"),
                           "proxy_train_s": rm.get("wall_s"),
                           "proxy_eval_accuracy": rm.get("eval_expected_accuracy"),
                           "proxy_noise_ceiling": rm.get("noise_ceiling")})


# ---- one run --------------------------------------------------------------------------------------
def run_one(study: Study, setup: TaskSetup, estimator: str, backend: str, seed: int, *,
            progress: bool = True, label: str = "") -> dict[str, Any]:
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.app.backends import get_backend

    t_start = time.perf_counter()
    cfg = PPOConfig(**study.config(estimator, seed))
    assert cfg.rollout_size == study.samples, (cfg.rollout_size, study.samples)
    evaluator = Evaluator(backend, setup.policy, setup.proxy, setup.eval_prompts, max_prompt_len=cfg.max_prompt_len,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=10_000 + seed,
                          batch_size=min(64, len(setup.eval_prompts)))
    reward = str(setup.reward) if isinstance(setup.reward, Path) else setup.reward
    trainer = get_backend(backend).PPOTrainer(str(setup.policy), reward, setup.train_prompts, config=cfg,
                                              extra_rewards={"gold": setup.gold})
    points: list[dict[str, Any]] = []
    train_s = 0.0
    step_s: list[float] = []

    def record(iteration: int) -> None:
        kl, scores, texts = evaluator(trainer.policy_model())
        gold = np.asarray(setup.gold(setup.eval_prompts, texts), np.float64)
        kl_mean = float(kl.mean())
        points.append({"iteration": iteration, "samples": iteration * cfg.rollout_size, "train_s": train_s,
                       "gold": float(gold.mean()), "gold_se": float(gold.std() / math.sqrt(len(gold))),
                       "proxy": float(np.mean(scores)) if np.isfinite(scores).all() else None,
                       "kl": kl_mean, "kl_se": float(kl.std() / math.sqrt(len(kl))),
                       "d": math.sqrt(max(kl_mean, 0.0)), "example": texts[0] if texts else ""})

    record(0)
    for it in range(1, study.iterations + 1):
        t = time.perf_counter()
        trainer.step()
        step_s.append(time.perf_counter() - t)
        train_s += step_s[-1]
        if it % study.eval_every == 0 or it == study.iterations:
            record(it)
            if progress:
                p = points[-1]
                _say(f"  {label} it {it:4d}: kl {p['kl']:.2f} gold {p['gold']:+.3f} proxy "
                     f"{_f(p['proxy'], '+.2f')}  ({train_s:.0f} s training)")
    # the time axis: training time in steady state -- the first step (JAX compiles there, or reads
    # the programs from the persistent compilation cache when an earlier run compiled them) counts
    # as a median step, so the order of the runs does not show; the measured first step is kept
    # apart, as is the raw cumulative time
    med = float(np.median(step_s)) if step_s else 0.0
    for p in points:
        p["train_s_raw"] = p["train_s"]
        if p["iteration"] >= 1:
            p["train_s"] = p["train_s"] - step_s[0] + med
    return {"estimator": estimator, "backend": backend, "seed": seed, "points": points,
            "step_s": step_s,
            "prompts_per_iteration": cfg.batch_size, "num_generations": cfg.num_generations,
            "samples_per_iteration": cfg.rollout_size, "train_s": train_s,
            "first_step_s": step_s[0] if step_s else None,
            "median_step_s": med if step_s else None,
            "wall_s": time.perf_counter() - t_start}


# ---- summaries ------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f") -> str:
    return "--" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _pm(s: dict, fmt: str = ".3f") -> str:
    if not s or s.get("mean") is None:
        return "--"
    return f"{format(s['mean'], fmt)} ± {format(s['std'], fmt)}"


def _best_within(run: list[dict], key: str, limit: float) -> float | None:
    """The best gold among a run's evaluation points with `key` <= limit (None if none)."""
    v = [p["gold"] for p in run if p[key] <= limit + 1e-12]
    return max(v) if v else None


def summarize(estimator: str, backend: str, records: list[dict]) -> dict[str, Any]:
    records = sorted(records, key=lambda r: r["seed"])
    n = min(len(r["points"]) for r in records)
    curve = {}
    for key in ("iteration", "samples", "train_s", "gold", "proxy", "kl"):
        vals = np.array([[np.nan if p[key] is None else p[key] for p in r["points"][:n]] for r in records], float)
        sd = vals.std(0, ddof=1) if len(records) > 1 else np.zeros(n)
        curve[key] = [x if math.isfinite(x) else None for x in vals.mean(0).tolist()]
        curve[key + "_std"] = [x if math.isfinite(x) else None for x in sd.tolist()]
    first, last = (lambda r: r["points"][0]), (lambda r: r["points"][n - 1])
    return {
        "estimator": estimator, "backend": backend, "seeds": [r["seed"] for r in records],
        "prompts_per_iteration": records[0]["prompts_per_iteration"],
        "num_generations": records[0]["num_generations"],
        "samples_per_iteration": records[0]["samples_per_iteration"],
        "runs": [r["points"] for r in records], "curve": curve,
        "gold_init": mean_std([first(r)["gold"] for r in records]),
        "final_gold": mean_std([last(r)["gold"] for r in records]),
        "final_gain": mean_std([last(r)["gold"] - first(r)["gold"] for r in records]),
        "best_gold": mean_std([max(p["gold"] for p in r["points"][:n]) for r in records]),
        "final_kl": mean_std([last(r)["kl"] for r in records]),
        "final_proxy": mean_std([last(r)["proxy"] for r in records]),
        "final_samples": last(records[0])["samples"],
        "train_s": mean_std([last(r)["train_s"] for r in records]),
        "median_step_s": mean_std([r["median_step_s"] for r in records]),
        "first_step_s": mean_std([r["first_step_s"] for r in records]),
    }


def compare(settings: list[dict]) -> None:
    """Adds the like-for-like numbers, per backend: the best gold reached within a common KL
    budget (the smallest final KL of that backend's estimators: every curve reaches it) and
    within a common training time (the shortest), and the final gold's difference from PPO's."""
    for b in BACKENDS:
        group = [s for s in settings if s["backend"] == b]
        if not group:
            continue
        kl_budget = min(max(p["kl"] for p in r) for s in group for r in s["runs"])
        t_budget = min(max(p["train_s"] for p in r) for s in group for r in s["runs"])
        ppo = next((s for s in group if s["estimator"] == "gae"), None)
        ranked = sorted(group, key=lambda s: -(s["final_gold"]["mean"] or -math.inf))
        for rank, s in enumerate(ranked, 1):
            s["rank_in_backend"] = rank
            s["kl_budget"], s["time_budget_s"] = kl_budget, t_budget
            s["gold_at_kl_budget"] = mean_std([_best_within(r, "kl", kl_budget) for r in s["runs"]])
            s["gold_at_time_budget"] = mean_std([_best_within(r, "train_s", t_budget) for r in s["runs"]])
            if ppo is not None:  # samples to PPO's final gold: the first point of the mean curve there
                target = ppo["final_gold"]["mean"]
                s["samples_to_ppo_final"] = next(
                    (n for n, g in zip(s["curve"]["samples"], s["curve"]["gold"]) if g is not None
                     and g >= target - 1e-12), None)
            if ppo is not None and s is not ppo:
                s["vs_ppo"] = _difference(s["final_gold"], ppo["final_gold"])


def _difference(a: dict, c: dict) -> dict[str, Any]:
    """a's mean minus c's (`mean_std` dicts over independent runs), its standard error and z."""
    se = math.sqrt(a["std"] ** 2 / a["n"] + c["std"] ** 2 / c["n"])
    return {"diff": a["mean"] - c["mean"], "se": se, "z": (a["mean"] - c["mean"]) / se if se > 0 else None}


def _vs_text(estimator: str, v: dict | None) -> str:
    """The 'vs PPO' cell: PPO's own row is the reference."""
    if estimator == "gae":
        return "(reference)"
    return "--" if v is None else f"{v['diff']:+.3f}" + (f" (z {v['z']:+.1f})" if v["z"] is not None else "")


def _to_target(s: dict) -> str:
    if "samples_to_ppo_final" not in s:
        return "--"
    n = s["samples_to_ppo_final"]
    return "not reached" if n is None else f"{round(n):,}"


def pooled(settings: list[dict]) -> list[dict[str, Any]]:
    """Per estimator, every run of both backends together: the parity tests prove the backends
    compute the same algorithm, and each samples with its own random numbers, so a seed in each
    is two independent runs of it (twice the runs per estimator). Final and best gold as mean
    and standard error over runs, with the final's difference from PPO's and its z; the KL and
    samples seen at each run's best evaluation."""
    runs: dict[str, list[list[dict]]] = {}
    for s in settings:
        runs.setdefault(s["estimator"], []).extend(s["runs"])

    def mse(xs: list[float]) -> dict[str, Any]:
        m = mean_std(xs)
        return m | {"se": m["std"] / math.sqrt(m["n"]) if m["n"] else None}

    out = []
    for e in (e for e in ESTIMATORS if e in runs):
        rs = runs[e]
        peaks = [max(r, key=lambda p: p["gold"]) for r in rs]
        out.append({"estimator": e, "runs": len(rs), "final_gold": mse([r[-1]["gold"] for r in rs]),
                    "best_gold": mse([p["gold"] for p in peaks]), "kl_at_best": mse([p["kl"] for p in peaks]),
                    "samples_at_best": mse([p["samples"] for p in peaks]),
                    "final_kl": mse([r[-1]["kl"] for r in rs])})
    ppo = next((p for p in out if p["estimator"] == "gae"), None)
    for p in out:
        if ppo is not None and p is not ppo:
            p["vs_ppo"] = _difference(p["final_gold"], ppo["final_gold"])
    return out


def _pooled_table(rows: list[dict]) -> list[str]:
    if not rows or max(p["runs"] for p in rows) < 2:
        return []
    lines = ["", "Pooled over both backends (each backend's seeds are independent runs of the same algorithm: "
             "mean ± standard error over all runs):", "",
             "| estimator | runs | final gold | vs PPO | best gold | KL at best | samples at best | final KL |",
             "|---|---|---|---|---|---|---|---|"]
    for p in rows:
        vs = _vs_text(p["estimator"], p.get("vs_ppo"))
        f = (lambda m, fmt=".3f": "--" if m["mean"] is None else f"{m['mean']:{fmt}} ± {m['se']:{fmt}}")
        lines.append(f"| {LABELS[p['estimator']]} | {p['runs']} | {f(p['final_gold'])} | {vs} | {f(p['best_gold'])} "
                     f"| {f(p['kl_at_best'], '.2f')} | {f(p['samples_at_best'], '.0f')} | {f(p['final_kl'], '.2f')} |")
    return lines


def table(summary: dict) -> str:
    st = summary["study"]
    lines = [f"`{summary['command']}` ({summary['finished_runs']} of {summary['planned_runs']} runs; "
             f"training time summed over them {summary['train_s_total'] / 60:.1f} min; cached, so a rerun "
             f"resumes and `--only-report` rebuilds these files)", "",
             f"Task {st['task']}: {st['model_size']} demo policy ({st['pretrain_steps']} pretraining steps), "
             + (f"trained against the {st['rm_pairs']}-pair proxy reward model (held-out accuracy "
                f"{_f(summary['task'].get('proxy_eval_accuracy'), '.3f')}, ceiling "
                f"{_f(summary['task'].get('proxy_noise_ceiling'), '.3f')})" if "proxy" in summary["task"]
                else "trained on the task's checker (verifiable reward)")
             + f", kl_coef {st['kl_coef']:g} in the reward, "
             f"kl_loss_coef {st['kl_loss_coef']:g}; {st['iterations']} iterations of {st['samples']} sampled "
             f"responses each for EVERY estimator (prompts x G shown); lr {st['ppo']['learning_rate']:g}, "
             f"{st['ppo']['ppo_epochs']} epochs x {st['ppo']['num_minibatches']} minibatches. Evaluated every "
             f"{st['eval_every']} iterations on {st['eval_prompts']} held-out prompts: gold = mean "
             f"{summary['metric']}, KL = mean per-response KL(pi || pi_init) in nats. Mean ± std over seeds. "
             f"Ranked within each backend by final gold; 'vs PPO' = final gold minus PPO's (z = the "
             f"difference over its standard error); 'gold @ KL <= k' / '@ t <= T s' = the best evaluated gold "
             f"within the backend's common KL budget / training time (the smallest any of its curves reached); "
             f"'samples to PPO's final' = the samples seen at the first evaluation where the mean curve (over "
             f"seeds) reached PPO's final mean gold ('not reached' if it never did).",
             "",
             "| backend | rank | estimator | prompts x G | seeds | gold(0) | final gold | vs PPO | best gold "
             "| samples to PPO's final | final KL | gold @ KL budget | gold @ time budget | final proxy | train s "
             "| s / iter | first iter s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary["settings"]:
        vs = _vs_text(s["estimator"], s.get("vs_ppo"))
        lines.append(
            f"| {s['backend']} | {s.get('rank_in_backend', '--')} | {LABELS[s['estimator']]} "
            f"| {s['prompts_per_iteration']} x {s['num_generations']} | {len(s['seeds'])} "
            f"| {_pm(s['gold_init'])} | {_pm(s['final_gold'])} | {vs} | {_pm(s['best_gold'])} "
            f"| {_to_target(s)} | {_pm(s['final_kl'], '.2f')} "
            f"| {_pm(s['gold_at_kl_budget'])} (KL <= {s['kl_budget']:.2f}) "
            f"| {_pm(s['gold_at_time_budget'])} (t <= {s['time_budget_s']:.0f} s) | {_pm(s['final_proxy'], '.2f')} "
            f"| {_pm(s['train_s'], '.0f')} | {_pm(s['median_step_s'], '.2f')} | {_pm(s['first_step_s'], '.1f')} |")
    lines += _pooled_table(summary.get("pooled", []))
    if summary["missing"]:
        m = summary["missing"]
        lines += ["", f"Not (yet) run: {len(m)} of {summary['planned_runs']} runs "
                      f"({', '.join(m[:12])}{' ...' if len(m) > 12 else ''})."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in BACKENDS if any(s["backend"] == b for s in summary["settings"])]
    axes_spec = (("kl", "KL(pi || pi_init) per response [nats]"), ("train_s", "training wall time [s]"),
                 ("samples", "responses sampled (trained on)"))
    fig, axes = plt.subplots(len(axes_spec), len(backends), figsize=(5.2 * len(backends), 10), squeeze=False)
    colors = dict(zip(ESTIMATORS, plt.get_cmap("tab10").colors))
    for j, b in enumerate(backends):
        for s in (s for s in summary["settings"] if s["backend"] == b):
            c = s["curve"]
            g, gs = np.array(c["gold"]), np.array(c["gold_std"])
            for i, (key, xlabel) in enumerate(axes_spec):
                ax = axes[i, j]
                x = np.array(c[key])
                ax.plot(x, g, "-o", ms=2.5, lw=1.5, color=colors[s["estimator"]],
                        label=f"{LABELS[s['estimator']]} ({len(s['seeds'])} seeds)")
                if len(s["seeds"]) > 1:
                    ax.fill_between(x, g - gs, g + gs, color=colors[s["estimator"]], alpha=0.15, lw=0)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{summary['metric']} ({summary['task_name']})")
                ax.grid(alpha=0.3)
        axes[0, j].set_title(f"{b}", fontsize=10)
        axes[0, j].legend(fontsize=7)
    fig.suptitle("Advantage estimators at equal samples per iteration (mean over seeds, ± 1 std band)", fontsize=10)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(study: Study, cache: Path, out: Path, command: str) -> dict[str, Any]:
    run_dir = cache / "estimator-runs" / study.run_key()
    records: dict[tuple[str, str], list[dict]] = {}
    missing = []
    for e, b, s in study.runs():
        f = run_dir / (run_name(e, b, s) + ".json")
        if f.exists():
            records.setdefault((e, b), []).append(json.loads(f.read_text()))
        else:
            missing.append(run_name(e, b, s))
    settings = [summarize(e, b, rs) for (e, b), rs in records.items()]
    settings.sort(key=lambda s: (BACKENDS.index(s["backend"]), ESTIMATORS.index(s["estimator"])))
    compare(settings)
    settings.sort(key=lambda s: (BACKENDS.index(s["backend"]), s["rank_in_backend"]))
    task_file = run_dir / "task.json"
    summary = {
        "command": command, "study": dataclasses.asdict(study) | {"run_key": study.run_key()},
        "task_name": study.task, "metric": "gold reward" if study.task == "reviews" else "accuracy (checker)",
        "task": json.loads(task_file.read_text()) if task_file.exists() else {},
        "planned_runs": len(study.runs()), "finished_runs": len(study.runs()) - len(missing),
        "missing": missing, "train_s_total": float(sum(r["train_s"] for rs in records.values() for r in rs)),
        "settings": settings, "pooled": pooled(settings),
    }
    write_atomic(out, json.dumps(summary, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), table(summary))
    written = [plots(summary, out)] if settings else []
    _say(f"wrote {out}, {out.with_suffix('.md')}" + "".join(f", {p}" for p in written))
    return summary


# ---- the command ----------------------------------------------------------------------------------
def _names(s: str, allowed: tuple[str, ...], what: str, p: argparse.ArgumentParser) -> tuple[str, ...]:
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    for x in out:
        if x not in allowed:
            p.error(f"unknown {what} {x!r}: choose from {', '.join(allowed)}")
    return out


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Study]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Study()
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, a 32-pair proxy, 2 iterations of 8 responses, 1 seed, "
                        "every estimator in both backends")
    p.add_argument("--task", default=d.task,
                   help=f"the task (default {d.task}; or a verifiable one, e.g. arithmetic: RL on its checker, "
                        f"gold = accuracy, the demo's settings for that task, 300 iterations; the defaults "
                        f"below are the reviews task's)")
    p.add_argument("--estimators", default=",".join(d.estimators))
    p.add_argument("--backends", default=",".join(d.backends))
    p.add_argument("--seeds", type=int, help=f"number of seeds 0..N-1 (default {len(d.seeds)})")
    p.add_argument("--samples", type=int, help=f"responses per iteration, every estimator (default {d.samples})")
    p.add_argument("--num-generations", type=int, help=f"G of the group estimators (default {d.num_generations})")
    p.add_argument("--iterations", type=int, help=f"(default {d.iterations})")
    p.add_argument("--eval-every", type=int, help=f"(default {d.eval_every})")
    p.add_argument("--eval-prompts", type=int, help=f"(default {d.eval_prompts})")
    p.add_argument("--kl-coef", type=float, help=f"KL penalty in the reward (default {d.kl_coef})")
    p.add_argument("--kl-loss-coef", type=float, help=f"KL term in the loss, k2 (default {d.kl_loss_coef})")
    p.add_argument("--lr", type=float, help=f"(default {d.ppo['learning_rate']})")
    p.add_argument("--rm-pairs", type=int, help=f"the proxy's preference pairs (default {d.rm_pairs})")
    p.add_argument("--model-size", help=f"(default {d.model_size})")
    p.add_argument("--pretrain-steps", type=int, help=f"(default {d.pretrain_steps})")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="checkpoints (shared with benchmarks.overoptimization) and finished runs")
    p.add_argument("--out", help="JSON file (default benchmarks/results/estimators.json; .md and .png beside it)")
    p.add_argument("--only-report", action="store_true", help="rebuild the outputs from the cached runs")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds after which no new run is started (0: no limit)")
    p.add_argument("--no-report", action="store_true", help="run only; don't write the outputs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.task != "reviews":
        from ppo_rlhf.errors import UsageError
        from ppo_rlhf.tasks import get_task

        try:
            task = get_task(args.task)
        except UsageError as e:
            p.error(str(e))
    study = Study.quick() if args.quick else Study.for_task(args.task)
    ch: dict[str, Any] = {"task": args.task,
                          "estimators": _names(args.estimators, ESTIMATORS, "estimator", p),
                          "backends": _names(args.backends, BACKENDS, "backend", p)}
    for name in ("samples", "num_generations", "iterations", "eval_every", "eval_prompts", "kl_coef",
                 "kl_loss_coef", "rm_pairs", "model_size", "pretrain_steps"):
        if getattr(args, name) is not None:
            ch[name] = getattr(args, name)
    if args.seeds is not None:
        ch["seeds"] = tuple(range(args.seeds))
    ppo = dict(study.ppo)
    if args.lr is not None:
        ppo["learning_rate"] = args.lr
    if args.task != "reviews" and args.quick:  # the task's own prompt / response lengths (else: for_task's)
        ppo.update(max_prompt_len=task.max_prompt_tokens, max_new_tokens=task.max_response_tokens)
    ch["ppo"] = ppo
    study = dataclasses.replace(study, **ch)
    for name in ("samples", "iterations", "eval_every", "eval_prompts", "rm_pairs", "pretrain_steps"):
        if getattr(study, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not study.seeds or not study.estimators or not study.backends:
        p.error("--seeds, --estimators and --backends must be non-empty")
    if any(e in GROUPED for e in study.estimators) and (
            study.num_generations < 2 or study.samples % study.num_generations):
        p.error(f"--num-generations must be >= 2 and divide --samples ({study.samples}): the group estimators "
                f"sample samples / G prompts x G")
    return args, study


def main(argv: list[str] | None = None) -> int:
    args, study = parse(argv)
    command = " ".join(["python", "-m", "benchmarks.estimators", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out) if args.out else default_out(study.task)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / ".gitignore").exists():  # never committed by accident
        (cache / ".gitignore").write_text("# created by benchmarks/estimators.py\n*\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ppo_rlhf.app.backends import skip_absent_accelerators

    skip_absent_accelerators()  # as the CLI: no TPU / GPU runtime start where no device is
    if args.only_report:
        build_report(study, cache, out, command)
        return 0
    if "jax" in study.backends:  # as the CLI: compiled programs kept on disk (PPO_RLHF_COMPILE_CACHE)
        from ppo_rlhf.app.backends import use_compile_cache

        use_compile_cache()
    t0 = time.perf_counter()
    progress = not args.no_progress
    setup = setup_task(study, cache, progress)
    run_dir = cache / "estimator-runs" / study.run_key()
    write_atomic(run_dir / "study.json", json.dumps(dataclasses.asdict(study), indent=1) + "\n")
    write_atomic(run_dir / "task.json", json.dumps(setup.info, indent=1, default=str) + "\n")
    todo = [r for r in study.runs() if not (run_dir / (run_name(*r) + ".json")).exists()]
    _say(f"{len(study.runs()) - len(todo)} of {len(study.runs())} runs cached in {run_dir}; {len(todo)} to run")
    done = failed = 0
    for e, b, s in todo:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            _say(f"time budget of {args.time_budget:.0f} s spent: stopping; rerun to continue")
            break
        name = run_name(e, b, s)
        _say(f"run {name}: {study.iterations} iterations of {study.samples} responses")
        try:
            rec = run_one(study, setup, e, b, s, progress=progress, label=name)
        except Exception as ex:  # one failed run must not lose the others; it is not cached
            failed += 1
            _say(f"run {name} FAILED: {type(ex).__name__}: {ex}")
            continue
        rec["study"] = study.run_key()
        write_atomic(run_dir / (name + ".json"), json.dumps(rec) + "\n")
        done += 1
        p = rec["points"]
        _say(f"run {name} done: gold {p[0]['gold']:+.3f} -> {p[-1]['gold']:+.3f} at KL {p[-1]['kl']:.2f} "
             f"({p[-1]['train_s']:.0f} s training in steady state, first step {rec['first_step_s']:.0f} s; "
             f"{rec['wall_s']:.0f} s in all)")
    _say(f"{done} runs finished, {failed} failed this session ({time.perf_counter() - t0:.0f} s)")
    if not args.no_report:
        build_report(study, cache, out, command)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
