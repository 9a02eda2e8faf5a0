"""Reward-model over-optimisation (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization") on the demo's reviews task, in both backends (issue 17).

    python -m benchmarks.overoptimization                          # the full run (resumable)
    python -m benchmarks.overoptimization --time-budget 3600       # at most ~1 h of it now
    python -m benchmarks.overoptimization --only-report            # outputs from what is cached
    python -m benchmarks.overoptimization --quick --out /tmp/oo/oo.json   # smoke test (< 2 min)

The study. As PPO moves the policy away from its initialisation -- distance d = sqrt(KL(pi ||
pi_init)), KL per response in nats -- the score of the proxy reward model it optimises keeps
rising, while the gold score (what the proxy was trained to imitate) rises, peaks and falls;
Gao et al. found R_gold(d) = d (alpha - beta log d) for RL, the peak moving later and higher with
more reward-model data. This task has what that needs: a gold reward (`reviews.gold_reward`), a
synthetic labeller with a known noise ceiling and a trainable proxy.

What it does, each step through the library's public interfaces:
  1. pretrains the demo's policy model once (JAX, `pipelines.pretrain_model`), cached;
  2. trains one proxy reward model per `--rm-pairs` amount of synthetic preference pairs
     (`reviews.preference_data`, labeller temperature `--temperature`, the train prompts) --
     ONCE, in JAX, from the pretrained policy, cached; both backends' PPO runs load the same
     proxy checkpoints (scalar-head checkpoints load in either backend), so the backends differ
     only in their own computation and random numbers;
  3. for each backend, proxy and seed runs PPO against the proxy with kl_coef 0 (and with each
     `--kl-coefs` value on the `--kl-proxy` proxy), logging the task's gold reward alongside
     (`extra_rewards`, never trained on); every `--eval-every` iterations (and before the first)
     it samples one response per held-out prompt (`--eval-prompts`: the task's 24 eval prompts,
     cycled; the same sampling seed at every point of a run, so successive points differ by the
     policy only) at the PPO sampling temperature and records
         d     = sqrt(max(KL, 0)), KL = mean over the samples of sum_t log pi(y_t|.) - log pi_init(y_t|.)
                 (the policy's own samples, log-probs at the sampling temperature: KL(pi || pi_init)
                 per response, the quantity `ppo-rlhf eval` reports)
         proxy = mean proxy reward-model score (normalised: mean 0 / std 1 on its training data)
         gold  = mean gold reward (in [-1, 1])
     Each finished (backend, rm_pairs, kl_coef, seed) run is written atomically to
     `--cache-dir/runs/<config hash>/`; a rerun skips finished runs, so the whole can be
     completed across sessions (`--time-budget` stops starting new runs after that many seconds);
  4. fits R(d) = d (alpha - beta log d) by least squares to each curve's GAIN over its initial
     point (gold - gold(0), as Gao et al. fit the gain over the initial policy; points with
     d > 0), for gold and for the proxy, per seed and pooled over seeds; the peak is at
     d* = exp(alpha / beta - 1) with R(d*) = beta d* (beta > 0; none otherwise);
  5. writes `--out` (JSON: per setting the runs' points, the fits, the empirical peak-and-fall
     and the two backends' agreement), a markdown table next to it and two PNG figures
     (`<out>.png`: gold and proxy gain vs d, one panel per proxy size, both backends, seed bands
     and fits; `<out>-kl.png`: the KL-penalty runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.rl_common import Evaluator as _Evaluator
from benchmarks.rl_common import config_hash as _hash
from benchmarks.rl_common import mean_std as _mean_std
from benchmarks.rl_common import write_atomic as _write_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKENDS = ("jax", "torch")
DEFAULT_OUT = HERE / "results" / "overoptimization.json"
DEFAULT_CACHE = HERE / ".cache" / "overoptimization"


def _say(msg: str) -> None:
    print(f"[overopt] {msg}", file=sys.stderr, flush=True)


# ---- the study's settings ------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """Every number that shapes the results (the cache keys hash these)."""

    backends: tuple[str, ...] = BACKENDS
    seeds: tuple[int, ...] = (0, 1, 2)
    # 1. the pretrained policy (the demo's, JAX)
    model_size: str = "small"
    pretrain_steps: int = 600
    # 2. the proxy reward models (JAX, once each): as benchmarks/rm_accuracy.py
    rm_pairs: tuple[int, ...] = (1000, 4000, 16000)
    rm_epochs: int = 4
    rm_lr: float = 3e-4
    rm_weight_decay: float = 0.1
    rm_batch_size: int = 16
    rm_eval_pairs: int = 1000           # held-out pairs (eval prompts), for the accuracy only
    temperature: float = 0.2            # the synthetic labeller's
    # 3. PPO (the demo's settings, kl_coef 0) and its evaluation
    kl_coefs: tuple[float, ...] = (0.05, 0.2)   # extra runs on the kl_proxy proxy
    kl_proxy: int | None = None         # None: the smallest proxy
    iterations: int = 150
    eval_every: int = 3
    eval_prompts: int = 96
    # the demo's PPO settings but lr 1e-5 (demo: 3e-5): at 3e-5 and kl_coef 0 the smallest proxy's
    # gold peaks within ~15 iterations and the policy collapses by ~40 (pilot, README)
    ppo: dict = field(default_factory=lambda: dict(
        batch_size=32, max_new_tokens=24, max_prompt_len=8, ppo_epochs=4, num_minibatches=2,
        learning_rate=1e-5, temperature=1.0, missing_eos_penalty=1.0))

    @classmethod
    def quick(cls) -> "Study":
        return cls(seeds=(0,), model_size="tiny", pretrain_steps=20, rm_pairs=(32,),
                   rm_epochs=1, rm_eval_pairs=32, kl_coefs=(0.2,), iterations=4, eval_every=2,
                   eval_prompts=16, ppo=dict(batch_size=8, max_new_tokens=24, max_prompt_len=8,
                                             ppo_epochs=2, num_minibatches=2, learning_rate=1e-4,
                                             temperature=1.0, missing_eos_penalty=1.0))

    @property
    def proxy_for_kl(self) -> int:
        return min(self.rm_pairs) if self.kl_proxy is None else self.kl_proxy

    def settings(self) -> list[tuple[int, float]]:
        """(rm_pairs, kl_coef) of every setting: kl 0 on each proxy, then the KL runs."""
        out = [(n, 0.0) for n in self.rm_pairs]
        out += [(self.proxy_for_kl, float(k)) for k in self.kl_coefs if float(k) != 0.0]
        return out

    def runs(self) -> list[tuple[str, int, float, int]]:
        """(backend, rm_pairs, kl_coef, seed) in the order they are run: seed by seed, so a
        partial run holds whole seeds of every setting in both backends."""
        return [(b, n, k, s) for s in self.seeds for n, k in self.settings() for b in self.backends]

    # cache keys: what each artefact depends on, nothing else
    def policy_key(self) -> str:
        return f"policy-{self.model_size}-{self.pretrain_steps}"

    def proxy_key(self, pairs: int) -> str:
        spec = (self.policy_key(), pairs, self.rm_epochs, self.rm_lr, self.rm_weight_decay,
                self.rm_batch_size, self.temperature)
        return f"rm-{pairs}-{_hash(spec)}"

    def run_key(self) -> str:
        """Hash of everything a PPO run depends on besides (backend, rm_pairs, kl_coef, seed)."""
        spec = (self.policy_key(), [self.proxy_key(n) for n in sorted(self.rm_pairs)],
                self.iterations, self.eval_every, self.eval_prompts, sorted(self.ppo.items()))
        return _hash(spec)


def run_name(backend: str, pairs: int, kl: float, seed: int) -> str:
    return f"{backend}-rm{pairs}-kl{kl:g}-seed{seed}"


# ---- 1. and 2.: the starting checkpoints ----------------------------------------------------------
def pretrained(study: Study, cache: Path, progress: bool, task: str = "reviews") -> tuple[Path, dict]:
    """The demo policy of `task`, pretrained once in JAX (cached; written to a temporary dir, then
    renamed). `task`: reviews (this study's); benchmarks.estimators passes others."""
    d = cache / (study.policy_key() if task == "reviews" else f"{task}-{study.policy_key()}")
    if not (d / "metrics.json").exists():
        from ppo_rlhf.app.pipelines import pretrain_model

        _say(f"pretraining the {study.model_size} {task} demo model, {study.pretrain_steps} steps (JAX) -> {d}")
        tmp = cache / f".{d.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        m = pretrain_model("jax", tmp, task=task, config={"num_steps": study.pretrain_steps, "seed": 0},
                           model_size=study.model_size, eval_samples=0, progress=progress)
        m["wall_s"] = time.perf_counter() - t0
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2, default=str) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d, json.loads((d / "metrics.json").read_text())


def proxy_model(study: Study, pairs: int, policy: Path, cache: Path, progress: bool) -> tuple[Path, dict]:
    """The proxy reward model trained on `pairs` synthetic preference pairs (JAX, once, cached)."""
    d = cache / study.proxy_key(pairs)
    if not (d / "metrics.json").exists():
        from ppo_jax.reward_model import RewardModelTrainer
        from ppo_rlhf import RMConfig
        from ppo_rlhf.feedback.labeller import SYNTHETIC_LABELS
        from ppo_rlhf.tasks import reviews

        _say(f"training the proxy reward model on {pairs} pairs (JAX, {study.rm_epochs} epochs) -> {d}")
        train = reviews.preference_data(pairs, seed=11, temperature=study.temperature)
        held_out = reviews.preference_data(study.rm_eval_pairs, seed=12, split="eval",
                                           temperature=study.temperature)
        cfg = RMConfig(num_epochs=study.rm_epochs, learning_rate=study.rm_lr,
                       batch_size=study.rm_batch_size, weight_decay=study.rm_weight_decay,
                       max_length=reviews.MAX_PROMPT_TOKENS + reviews.MAX_RESPONSE_TOKENS + 2, seed=0)
        tmp = cache / f".{d.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        m = RewardModelTrainer(str(policy), cfg, out_dir=tmp).fit(
            list(train.records), list(held_out.records), progress=progress,
            eval_noise_ceiling=held_out.noise_ceiling, label_quality=SYNTHETIC_LABELS)
        m.update(pairs=pairs, wall_s=time.perf_counter() - t0, train_noise_ceiling=train.noise_ceiling)
        (tmp / "metrics.json").write_text(json.dumps(m, indent=2, default=str) + "\n")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d, json.loads((d / "metrics.json").read_text())


# ---- 3. PPO against a proxy, evaluated on held-out prompts ----------------------------------------
def run_ppo(study: Study, backend: str, policy: Path, proxy: Path, kl_coef: float, seed: int, *,
            progress: bool = True, label: str = "") -> dict[str, Any]:
    """One PPO run against `proxy`, evaluated every `study.eval_every` iterations: its record."""
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.app.backends import get_backend
    from ppo_rlhf.tasks import reviews

    t_start = time.perf_counter()
    ppo = dict(study.ppo)
    cfg = PPOConfig(**ppo, kl_coef=kl_coef, num_iterations=study.iterations, seed=seed)
    eval_prompts = [reviews.eval_prompts()[i % len(reviews.eval_prompts())] for i in range(study.eval_prompts)]
    evaluator = _Evaluator(backend, policy, proxy, eval_prompts, max_prompt_len=cfg.max_prompt_len,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           seed=10_000 + seed, batch_size=min(64, study.eval_prompts))
    trainer = get_backend(backend).PPOTrainer(
        str(policy), str(proxy), reviews.train_prompts(), config=cfg,
        extra_rewards={"gold": reviews.gold_reward})
    points: list[dict[str, Any]] = []
    eval_s = 0.0
    window: list[dict[str, float]] = []

    def record(iteration: int) -> None:
        nonlocal eval_s, window
        t = time.perf_counter()
        kl, scores, texts = evaluator(trainer.policy_model())
        gold = np.asarray(reviews.gold_reward(eval_prompts, texts), np.float64)
        eval_s += time.perf_counter() - t
        kl_mean = float(kl.mean())
        p = {"iteration": iteration, "d": math.sqrt(max(kl_mean, 0.0)), "proxy": float(scores.mean()),
             "gold": float(gold.mean()), "kl": kl_mean, "kl_se": float(kl.std() / math.sqrt(len(kl))),
             "gold_se": float(gold.std() / math.sqrt(len(gold))),
             "proxy_se": float(scores.std() / math.sqrt(len(scores))),
             "samples": [texts[i] for i in range(min(2, len(texts)))]}
        if window:  # training-batch means since the previous point (train prompts, on-policy)
            for key in ("objective/scores", "objective/gold", "objective/kl"):
                vals = [w[key] for w in window if key in w]
                if vals:
                    p["train_" + key.split("/")[1]] = float(np.mean(vals))
        window = []
        points.append(p)

    record(0)
    for it in range(1, study.iterations + 1):
        stats = trainer.step()
        window.append({k: float(v) for k, v in stats.items()
                       if k in ("objective/scores", "objective/gold", "objective/kl")})
        if it % study.eval_every == 0 or it == study.iterations:
            record(it)
            if progress or len(points) % 5 == 1:
                p = points[-1]
                _say(f"  {label or backend} it {it:4d}: d {p['d']:.2f} proxy "
                     f"{p['proxy']:+.2f} gold {p['gold']:+.3f}  ({time.perf_counter() - t_start:.0f} s)")
    return {"backend": backend, "kl_coef": float(kl_coef), "seed": seed, "points": points,
            "wall_s": time.perf_counter() - t_start, "eval_s": eval_s,
            "final_samples": points[-1]["samples"]}


# ---- 4. the fit ------------------------------------------------------------------------------------
def fit_gao(d: Sequence[float], r: Sequence[float]) -> dict[str, Any]:
    """Least squares of r = d (alpha - beta log d) over the points with d > 0 (linear in alpha,
    beta: columns d and -d log d). Returns alpha, beta, the peak d* = exp(alpha/beta - 1) and
    R(d*) = beta d* (None when beta <= 0: no peak), and R^2 (uncentred: the model has no intercept)."""
    d = np.asarray(d, np.float64)
    r = np.asarray(r, np.float64)
    keep = d > 0
    d, r = d[keep], r[keep]
    out: dict[str, Any] = {"alpha": None, "beta": None, "peak_d": None, "peak": None, "r2": None,
                           "points": int(len(d))}
    if len(d) < 2:
        return out
    X = np.stack([d, -d * np.log(d)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(X, r, rcond=None)
    resid = r - X @ np.array([alpha, beta])
    ss = float(np.sum(r ** 2))
    out.update(alpha=float(alpha), beta=float(beta), r2=(1 - float(np.sum(resid ** 2)) / ss) if ss > 0 else None)
    if beta > 0:
        peak_d = math.exp(alpha / beta - 1)
        out.update(peak_d=peak_d, peak=float(beta * peak_d))
    return out


def gao_curve(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    d = np.asarray(d, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def _smooth(x: np.ndarray, w: int = 3) -> np.ndarray:
    """Centred moving average over `w` evaluation points (shrinking at the ends)."""
    h = w // 2
    return np.array([x[max(0, i - h):i + h + 1].mean() for i in range(len(x))])


def peak_and_fall(runs: list[list[dict]]) -> dict[str, Any]:
    """Model-free evidence of over-optimisation in one setting. The peak is located on the
    seed-mean gold curve smoothed over 3 evaluation points (iteration i*); per seed, the fall is
    its gold averaged over the 3 points around i* minus its gold averaged over the last 3 points,
    and the proxy's rise over the same two windows. `peaks_and_falls`: the fall and the rise are
    positive in every seed and the mean fall exceeds twice its standard error over seeds."""
    n = min(len(r) for r in runs)
    gold = np.array([[p["gold"] for p in r[:n]] for r in runs])
    proxy = np.array([[p["proxy"] for p in r[:n]] for r in runs])
    d = np.array([[p["d"] for p in r[:n]] for r in runs])
    i_peak = int(np.argmax(_smooth(gold.mean(0))))
    around = slice(max(0, i_peak - 1), i_peak + 2)
    last = slice(max(0, n - 3), n)
    fall = gold[:, around].mean(1) - gold[:, last].mean(1)
    rise = proxy[:, last].mean(1) - proxy[:, around].mean(1)
    se = float(fall.std(ddof=1) / math.sqrt(len(fall))) if len(fall) > 1 else None
    return {
        "peak_iteration": runs[0][i_peak]["iteration"], "peak_d": float(d[:, i_peak].mean()),
        "peak_gold_gain": float((gold[:, around].mean(1) - gold[:, 0]).mean()),
        "final_d": float(d[:, -1].mean()), "final_gold_gain": float((gold[:, last].mean(1) - gold[:, 0]).mean()),
        "gold_fall": _mean_std(fall.tolist()), "gold_fall_se": se,
        "proxy_rise": _mean_std(rise.tolist()),
        "peaks_and_falls": bool(np.all(fall > 0) and np.all(rise > 0) and i_peak < n - 2
                                and (se is None or fall.mean() > 2 * se)),
    }


FLOOR_TOLERANCE = 0.02


def until_floor(run: list[dict], floor: float | None = None) -> list[dict]:
    """The points of a run up to (and including) the first whose mean gold is within
    FLOOR_TOLERANCE of the gold reward's lower bound (reviews.GOLD_RANGE: -1, every response ill
    formed). The gold reward is bounded, so once a collapsed policy sits at the floor further
    steps move d but not gold: those points say nothing about R(d) and are left out of the fits."""
    if floor is None:
        from ppo_rlhf.tasks.reviews import GOLD_RANGE

        floor = GOLD_RANGE[0]
    for i, p in enumerate(run):
        if p["gold"] <= floor + FLOOR_TOLERANCE:
            return run[:i + 1]
    return run


def summarize_setting(backend: str, pairs: int, kl: float, records: list[dict]) -> dict[str, Any]:
    """A setting's entry of the JSON: runs (points {iteration, d, proxy, gold}, one list per
    seed), the pooled fit over seeds (alpha, beta, peak_gold, peak_d; gold GAIN over the initial
    policy; each run's points up to its gold floor, `until_floor`), per-seed fits (mean +- std),
    the proxy's fit (same points), and the empirical peak-and-fall (all points)."""
    runs = [[{k: p[k] for k in ("iteration", "d", "proxy", "gold")} for p in r["points"]] for r in records]
    fitted = [until_floor(r) for r in runs]
    gains = lambda r, key: [p[key] - r[0][key] for p in r]
    pooled_d = [p["d"] for r in fitted for p in r]
    gold_fit = fit_gao(pooled_d, [g for r in fitted for g in gains(r, "gold")])
    proxy_fit = fit_gao(pooled_d, [g for r in fitted for g in gains(r, "proxy")])
    per_seed = [fit_gao([p["d"] for p in r], gains(r, "gold")) for r in fitted]
    per_seed_proxy = [fit_gao([p["d"] for p in r], gains(r, "proxy")) for r in fitted]
    max_d = max(pooled_d)
    in_range = lambda fit, points: fit["peak_d"] is not None and fit["peak_d"] <= max(p["d"] for p in points)
    return {
        "backend": backend, "rm_pairs": int(pairs), "kl_coef": float(kl),
        "seeds": [r["seed"] for r in records], "runs": runs,
        "gold_init": float(np.mean([r[0]["gold"] for r in runs])),
        "proxy_init": float(np.mean([r[0]["proxy"] for r in runs])),
        "alpha": gold_fit["alpha"], "beta": gold_fit["beta"],
        "peak_gold": gold_fit["peak"], "peak_d": gold_fit["peak_d"],
        "peak_in_range": in_range(gold_fit, [p for r in fitted for p in r]),
        "fit_r2": gold_fit["r2"], "max_d": max_d, "fit_points": gold_fit["points"],
        "points_at_floor_left_out": sum(len(r) - len(f) for r, f in zip(runs, fitted)),
        "max_d_all": max(p["d"] for r in runs for p in r),
        "proxy_alpha": proxy_fit["alpha"], "proxy_beta": proxy_fit["beta"],
        "proxy_peak_d": proxy_fit["peak_d"],
        # a seed's fitted peak counts only where it lies within that seed's data: beta ~ 0 (no
        # fall yet, as with a strong KL penalty) puts d* = exp(alpha/beta - 1) anywhere, 1e100 too
        "seed_fits": {**{k: _mean_std([f[k] for f in per_seed]) for k in ("alpha", "beta")},
                      **{k: _mean_std([f[src] if in_range(f, r) else None for f, r in zip(per_seed, fitted)])
                         for k, src in (("peak_gold", "peak"), ("peak_d", "peak_d"))}},
        "seed_proxy_fits": {k: _mean_std([f[k] for f in per_seed_proxy]) for k in ("alpha", "beta")},
        "empirical": peak_and_fall(runs),
        "wall_s": float(sum(r["wall_s"] for r in records)),
        "final_samples": records[0].get("final_samples", []),
    }


def agreement(a: dict, b: dict) -> dict[str, Any]:
    """Do two backends' curves of one setting agree within seed noise? Per-seed summary numbers
    of each run (gold and proxy gain, and d, at the empirical peak iteration and at the end),
    compared by Welch's z = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b); and along the curve,
    the share of evaluation points whose seed-mean gold differs by less than 2 such standard
    errors. Needs >= 2 seeds in each backend."""
    n = min(len(r) for r in a["runs"] + b["runs"])
    i_peak = next((i for i, p in enumerate(a["runs"][0][:n]) if p["iteration"] == a["empirical"]["peak_iteration"]), 0)

    def per_seed(s: dict) -> dict[str, np.ndarray]:
        g = np.array([[p["gold"] - r[0]["gold"] for p in r[:n]] for r in s["runs"]])
        x = np.array([[p["proxy"] - r[0]["proxy"] for p in r[:n]] for r in s["runs"]])
        d = np.array([[p["d"] for p in r[:n]] for r in s["runs"]])
        return {"gold_gain_at_peak": g[:, i_peak], "d_at_peak": d[:, i_peak], "proxy_gain_at_peak": x[:, i_peak],
                "final_gold_gain": g[:, -1], "final_d": d[:, -1], "final_proxy_gain": x[:, -1],
                "_gold": g, "_d": d}

    pa, pb = per_seed(a), per_seed(b)
    if len(a["runs"]) < 2 or len(b["runs"]) < 2:
        return {"judged": False, "why": "fewer than 2 seeds in a backend"}

    def z(x: np.ndarray, y: np.ndarray) -> float:
        se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        return float((x.mean() - y.mean()) / se) if se > 0 else 0.0

    metrics = {k: {"a": _mean_std(pa[k].tolist()), "b": _mean_std(pb[k].tolist()), "z": z(pa[k], pb[k])}
               for k in pa if not k.startswith("_")}
    zs_curve = [z(pa["_gold"][:, i], pb["_gold"][:, i]) for i in range(1, n)]
    return {"judged": True, "backends": [a["backend"], b["backend"]], "metrics": metrics,
            "max_abs_z": float(max(abs(m["z"]) for m in metrics.values())),
            "curve_points": len(zs_curve),
            "curve_share_within_2se": float(np.mean([abs(v) < 2 for v in zs_curve])) if zs_curve else None,
            "agree": bool(all(abs(m["z"]) < 3 for m in metrics.values()))}


# ---- 5. outputs ------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f") -> str:
    return "--" if x is None else format(x, fmt)


def _pm(s: dict, fmt: str = ".2f") -> str:
    if not s or s.get("mean") is None:
        return "--"
    return f"{format(s['mean'], fmt)} +- {format(s['std'], fmt)}" + (f" ({s['n']})" if s.get("n", 0) > 0 else "")


def table(summary: dict) -> str:
    st = summary["study"]
    cost = (f"{summary['finished_runs']} of {summary['planned_runs']} runs; compute, summed over the runs "
            f"as each was measured on its machine: PPO {summary['ppo_wall_s'] / 3600:.2f} h, proxies "
            f"{summary['proxy_wall_s'] / 60:.0f} min, pretraining {summary['pretrain_s'] / 60:.0f} min")
    lines = [f"`{summary['command']}` ({cost}; the runs are cached, so a rerun of "
             f"`python -m benchmarks.overoptimization` resumes and `--only-report` rebuilds these files)", "",
             f"Reviews task, {st['model_size']} demo policy ({st['pretrain_steps']} pretraining steps, JAX); "
             f"proxies trained once in JAX ({st['rm_epochs']} epochs, labeller temperature {st['temperature']}), "
             f"loaded by both backends; PPO {st['iterations']} iterations of {st['ppo']['batch_size']} prompts, "
             f"lr {st['ppo']['learning_rate']}, evaluated every {st['eval_every']} iterations on "
             f"{st['eval_prompts']} held-out prompts. Gains are over the initial policy; d = sqrt(KL) "
             f"in sqrt(nats per response). Fit: gold gain = d (alpha - beta log d), pooled over seeds; "
             f"+- is the std over per-seed fits (in parentheses: the number of seeds whose fitted peak lies "
             f"within their data).", "",
             "| proxy pairs | held-out acc. (ceiling) |", "|---|---|"]
    for p in summary["proxies"]:
        lines.append(f"| {p['pairs']} | {_f(p['eval_expected_accuracy'], '.3f')} ({_f(p['noise_ceiling'], '.3f')}) |")
    lines += ["", "Fits of the gold gain, R(d) = d (alpha - beta log d), and of the proxy gain:", "",
              "| backend | pairs | kl | seeds | gold(0) | alpha | beta | peak d* | peak gold gain R(d*) "
              "| R^2 | fitted up to d | proxy alpha, beta |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary["settings"]:
        sf = s["seed_fits"]
        beyond = s["peak_d"] is not None and not s["peak_in_range"]
        peak = f"beyond the data (> {s['max_d']:.2f})" if beyond else _f(s["peak_d"])
        peak_gold = "--" if beyond else _f(s["peak_gold"], "+.3f")
        lines.append(
            f"| {s['backend']} | {s['rm_pairs']} | {s['kl_coef']:g} | {len(s['runs'])} | {s['gold_init']:+.3f} "
            f"| {_f(s['alpha'])} ({_pm(sf['alpha'])}) | {_f(s['beta'])} ({_pm(sf['beta'])}) "
            f"| {peak} ({_pm(sf['peak_d'])}) | {peak_gold} ({_pm(sf['peak_gold'], '.3f')}) "
            f"| {_f(s['fit_r2'])} | {s['max_d']:.2f} | {_f(s['proxy_alpha'])}, {_f(s['proxy_beta'])} |")
    lines += ["", "Empirical peak and fall (no fit; peak located on the seed-mean gold, smoothed over 3 "
                  "evaluations; fall = gold around the peak - gold over the last 3 evaluations, per seed):", "",
              "| backend | pairs | kl | peak at iteration | d there | gold gain there | gold fall after it "
              "| proxy rise after it | peaks & falls | final d | final gold gain |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary["settings"]:
        e = s["empirical"]
        lines.append(
            f"| {s['backend']} | {s['rm_pairs']} | {s['kl_coef']:g} | {e['peak_iteration']} | {e['peak_d']:.2f} "
            f"| {e['peak_gold_gain']:+.3f} | {_pm(e['gold_fall'], '.3f')} | {_pm(e['proxy_rise'])} "
            f"| {'yes' if e['peaks_and_falls'] else 'no'} | {e['final_d']:.2f} | {e['final_gold_gain']:+.3f} |")
    if summary["agreement"]:
        lines += ["", "Backend agreement (Welch z of per-seed numbers; |z| < 3 on all = agree):", "",
                  "| pairs | kl | gold gain at peak (jax / torch) | d at peak | final gold gain | final d "
                  "| final proxy gain | max abs z | curve points within 2 SE | agree |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in summary["agreement"]:
            if not g["judged"]:
                lines.append(f"| {g['rm_pairs']} | {g['kl_coef']:g} | {g['why']} ||||||||")
                continue
            m = g["metrics"]
            cell = lambda k, fmt=".2f": (f"{format(m[k]['a']['mean'], fmt)} / {format(m[k]['b']['mean'], fmt)} "
                                         f"(z {m[k]['z']:+.1f})")
            lines.append(f"| {g['rm_pairs']} | {g['kl_coef']:g} | {cell('gold_gain_at_peak', '.3f')} "
                         f"| {cell('d_at_peak')} | {cell('final_gold_gain', '.3f')} | {cell('final_d')} "
                         f"| {cell('final_proxy_gain')} | {g['max_abs_z']:.1f} "
                         f"| {g['curve_share_within_2se']:.0%} of {g['curve_points']} "
                         f"| {'yes' if g['agree'] else 'no'} |")
    if summary["missing"]:
        lines += ["", f"Not (yet) run: {len(summary['missing'])} of {summary['planned_runs']} runs "
                      f"({', '.join(summary['missing'][:12])}{' ...' if len(summary['missing']) > 12 else ''})."]
    return "\n".join(lines) + "\n"


_COLORS = {"jax": "tab:blue", "torch": "tab:orange"}


def _bands(ax: Any, runs: list[list[dict]], key: str, color: str, style: str, label: str) -> None:
    """Seed-mean curve (mean d, mean gain at each evaluation iteration) with a +-1 std band."""
    n = min(len(r) for r in runs)
    d = np.array([[p["d"] for p in r[:n]] for r in runs]).mean(0)
    y = np.array([[p[key] - r[0][key] for p in r[:n]] for r in runs])
    m = y.mean(0)
    ax.plot(d, m, style, color=color, lw=1.6, marker="o", ms=2.5, label=label)
    if len(runs) > 1:
        s = y.std(0, ddof=1)
        ax.fill_between(d, m - s, m + s, color=color, alpha=0.18, lw=0)


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    settings = summary["settings"]
    by = {(s["backend"], s["rm_pairs"], s["kl_coef"]): s for s in settings}
    pairs = sorted({s["rm_pairs"] for s in settings if s["kl_coef"] == 0})
    kl_pairs = summary["study"]["kl_proxy"] or min(summary["study"]["rm_pairs"])
    kls = sorted({s["kl_coef"] for s in settings if s["rm_pairs"] == kl_pairs})
    for name, columns, title in (
            ("", [(n, 0.0) for n in pairs], lambda n, k: f"proxy RM: {n} pairs, kl_coef 0"),
            ("-kl", [(kl_pairs, k) for k in kls], lambda n, k: f"proxy RM: {n} pairs, kl_coef {k:g}")):
        if not columns:
            continue
        fig, axes = plt.subplots(2, len(columns), figsize=(4.2 * len(columns), 6.4), squeeze=False,
                                 sharex="col")
        for j, (n, k) in enumerate(columns):
            ax_g, ax_p = axes[0, j], axes[1, j]
            for b in BACKENDS:
                s = by.get((b, n, k))
                if s is None:
                    continue
                c = _COLORS[b]
                _bands(ax_g, s["runs"], "gold", c, "-", f"{b} ({len(s['runs'])} seeds)")
                _bands(ax_p, s["runs"], "proxy", c, "--", f"{b} proxy")
                grid = np.linspace(0, s["max_d"], 100)
                if s["alpha"] is not None:
                    ax_g.plot(grid, gao_curve(grid, s["alpha"], s["beta"]), ":", color=c, lw=1.2,
                              label=f"{b} fit: d({s['alpha']:.2f} - {s['beta']:.2f} log d)")
                if s["proxy_alpha"] is not None:
                    ax_p.plot(grid, gao_curve(grid, s["proxy_alpha"], s["proxy_beta"]), ":", color=c, lw=1.2)
            ax_g.axhline(0, color="0.6", lw=0.6)
            ax_g.set_title(title(n, k), fontsize=10)
            ax_g.set_ylabel("gold score - initial")
            ax_p.set_ylabel("proxy RM score - initial")
            ax_p.set_xlabel("d = sqrt(KL(pi || pi_init))  [sqrt nats]")
            ax_g.legend(fontsize=7, loc="lower left")
            ax_g.grid(alpha=0.3)
            ax_p.grid(alpha=0.3)
        fig.suptitle("Reward-model over-optimisation, reviews task\n(mean over seeds, +-1 std band; "
                     "dotted: d (alpha - beta log d) fitted)", fontsize=10)
        fig.tight_layout()
        path = out.with_name(out.stem + name + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def build_report(study: Study, cache: Path, out: Path, command: str,
                 extra: dict | None = None) -> dict[str, Any]:
    run_dir = cache / "runs" / study.run_key()
    records: dict[tuple[str, int, float], list[dict]] = {}
    missing = []
    for b, n, k, s in study.runs():
        f = run_dir / (run_name(b, n, k, s) + ".json")
        if f.exists():
            records.setdefault((b, n, k), []).append(json.loads(f.read_text()))
        else:
            missing.append(run_name(b, n, k, s))
    settings = [summarize_setting(b, n, k, rs) for (b, n, k), rs in records.items()]
    settings.sort(key=lambda s: (s["kl_coef"] != 0, s["rm_pairs"], s["kl_coef"], BACKENDS.index(s["backend"])))
    by = {(s["backend"], s["rm_pairs"], s["kl_coef"]): s for s in settings}
    agree = []
    for n, k in study.settings():
        if ("jax", n, k) in by and ("torch", n, k) in by:
            agree.append({"rm_pairs": n, "kl_coef": k, **agreement(by[("jax", n, k)], by[("torch", n, k)])})
    proxies = []
    for n in study.rm_pairs:
        mf = cache / study.proxy_key(n) / "metrics.json"
        if mf.exists():
            m = json.loads(mf.read_text())
            proxies.append({"pairs": n, "eval_accuracy": m.get("eval_accuracy"),
                            "eval_expected_accuracy": m.get("eval_expected_accuracy"),
                            "noise_ceiling": m.get("noise_ceiling"), "train_accuracy": m.get("train_accuracy"),
                            "steps": m.get("steps"), "train_s": m.get("wall_s")})
    pm = cache / study.policy_key() / "metrics.json"
    summary = {
        "command": command, "study": dataclasses.asdict(study) | {"run_key": study.run_key()},
        "proxies": proxies,
        "pretrain_s": json.loads(pm.read_text()).get("wall_s") if pm.exists() else None,
        "ppo_wall_s": float(sum(s["wall_s"] for s in settings)),
        "proxy_wall_s": float(sum(p["train_s"] or 0 for p in proxies)),
        "planned_runs": len(study.runs()), "finished_runs": len(study.runs()) - len(missing),
        "missing": missing, "settings": settings, "agreement": agree, **(extra or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, json.dumps(summary, indent=1) + "\n")
    md = table(summary)
    _write_atomic(out.with_suffix(".md"), md)
    written = plots(summary, out) if settings else []
    _say(f"wrote {out}, {out.with_suffix('.md')}" + "".join(f", {p}" for p in written))
    return summary


# ---- the command -------------------------------------------------------------------------------------
def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Study]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Study()
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, one 32-pair proxy, kl 0 and 0.2, 4 iterations, 1 seed, "
                        "both backends (< 2 min)")
    p.add_argument("--backends", default=",".join(d.backends))
    p.add_argument("--seeds", type=int, help=f"number of seeds 0..N-1 (default {len(d.seeds)})")
    p.add_argument("--rm-pairs", type=_ints, help=f"proxy sizes (default {','.join(map(str, d.rm_pairs))})")
    p.add_argument("--kl-coefs", type=_floats,
                   help=f"extra KL coefficients on --kl-proxy (default {','.join(map(str, d.kl_coefs))})")
    p.add_argument("--kl-proxy", type=int, help="the proxy of the KL runs (default: the smallest)")
    p.add_argument("--iterations", type=int, help=f"PPO iterations per run (default {d.iterations})")
    p.add_argument("--eval-every", type=int, help=f"iterations between evaluations (default {d.eval_every})")
    p.add_argument("--eval-prompts", type=int, help=f"held-out samples per evaluation (default {d.eval_prompts})")
    p.add_argument("--lr", type=float, help=f"PPO learning rate (default {d.ppo['learning_rate']})")
    p.add_argument("--batch-size", type=int, help=f"PPO prompts per iteration (default {d.ppo['batch_size']})")
    p.add_argument("--model-size", help=f"demo policy size (default {d.model_size})")
    p.add_argument("--pretrain-steps", type=int, help=f"(default {d.pretrain_steps})")
    p.add_argument("--rm-epochs", type=int, help=f"(default {d.rm_epochs})")
    p.add_argument("--temperature", type=float, help=f"labeller temperature (default {d.temperature})")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="checkpoints and finished runs (default benchmarks/.cache/overoptimization)")
    p.add_argument("--out", help="JSON file (default benchmarks/results/overoptimization.json; "
                                 "the .md and .png files go next to it)")
    p.add_argument("--only-report", action="store_true", help="rebuild the outputs from the cached runs")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds after which no new run is started (0: no limit)")
    p.add_argument("--no-report", action="store_true", help="run only; don't write the outputs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    study = Study.quick() if args.quick else Study()
    ch: dict[str, Any] = {}
    backends = tuple(b for b in args.backends.split(",") if b)
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
    ch["backends"] = backends
    for name in ("rm_pairs", "kl_coefs", "kl_proxy", "iterations", "eval_every", "eval_prompts",
                 "model_size", "pretrain_steps", "rm_epochs", "temperature"):
        if getattr(args, name) is not None:
            ch[name] = getattr(args, name)
    if args.seeds is not None:
        ch["seeds"] = tuple(range(args.seeds))
    ppo = dict(study.ppo)
    if args.lr is not None:
        ppo["learning_rate"] = args.lr
    if args.batch_size is not None:
        ppo["batch_size"] = args.batch_size
    ch["ppo"] = ppo
    study = dataclasses.replace(study, **ch)
    for name in ("iterations", "eval_every", "eval_prompts", "pretrain_steps", "rm_epochs"):
        if getattr(study, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not study.seeds or not study.rm_pairs or min(study.rm_pairs) < 1:
        p.error("--seeds and --rm-pairs must be >= 1")
    if study.kl_proxy is not None and study.kl_proxy not in study.rm_pairs:
        p.error(f"--kl-proxy {study.kl_proxy} is not one of --rm-pairs")
    if any(k < 0 for k in study.kl_coefs):
        p.error("--kl-coefs must be >= 0")
    return args, study


def main(argv: list[str] | None = None) -> int:
    args, study = parse(argv)
    command = " ".join(["python", "-m", "benchmarks.overoptimization",
                        *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out) if args.out else DEFAULT_OUT
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / ".gitignore").exists():  # as pytest's cache: never committed by accident
        (cache / ".gitignore").write_text("# created by benchmarks/overoptimization.py\n*\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ppo_rlhf.app.backends import skip_absent_accelerators

    skip_absent_accelerators()  # as the CLI: no TPU / GPU runtime start where no device is
    if args.only_report:
        build_report(study, cache, out, command)
        return 0
    t0 = time.perf_counter()
    progress = not args.no_progress
    policy, _ = pretrained(study, cache, progress)
    proxies = {n: proxy_model(study, n, policy, cache, progress)[0] for n in study.rm_pairs}
    run_dir = cache / "runs" / study.run_key()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "study.json", json.dumps(dataclasses.asdict(study), indent=1) + "\n")
    todo = [r for r in study.runs() if not (run_dir / (run_name(*r) + ".json")).exists()]
    _say(f"{len(study.runs()) - len(todo)} of {len(study.runs())} runs cached in {run_dir}; {len(todo)} to run")
    done = failed = 0
    for b, n, k, s in todo:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            _say(f"time budget of {args.time_budget:.0f} s spent: stopping; rerun to continue")
            break
        name = run_name(b, n, k, s)
        _say(f"run {name}: {study.iterations} iterations")
        try:
            rec = run_ppo(study, b, policy, proxies[n], k, s, progress=progress, label=name)
        except Exception as e:  # one failed run must not lose the others; it is not cached
            failed += 1
            _say(f"run {name} FAILED: {type(e).__name__}: {e}")
            continue
        rec.update(rm_pairs=n, proxy=str(proxies[n].name), policy=str(policy.name), study=study.run_key())
        _write_atomic(run_dir / (name + ".json"), json.dumps(rec) + "\n")
        done += 1
        p = rec["points"]
        best = max(p, key=lambda q: q["gold"])
        _say(f"run {name} done in {rec['wall_s']:.0f} s: gold {p[0]['gold']:+.3f} -> max {best['gold']:+.3f} "
             f"(d {best['d']:.2f}) -> {p[-1]['gold']:+.3f} (d {p[-1]['d']:.2f}); proxy {p[0]['proxy']:+.2f} "
             f"-> {p[-1]['proxy']:+.2f}")
    _say(f"{done} runs finished, {failed} failed this session ({time.perf_counter() - t0:.0f} s)")
    if not args.no_report:
        build_report(study, cache, out, command)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
