"""benchmarks/overoptimization.py (issue 17): the Gao et al. fit on points from known coefficients,
the peak-and-fall criterion, and the quick mode end to end -- JSON schema, table, figures, and a
rerun that skips the cached runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.overoptimization import fit_gao, gao_curve, peak_and_fall
from tests.helpers import run_module


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.5), (0.4, 0.3), (1.0, 0.4)])
def test_fit_recovers_known_coefficients_and_the_peak(alpha, beta):
    d = np.linspace(0.05, 6.0, 40)
    f = fit_gao(np.concatenate([[0.0], d]), np.concatenate([[0.0], gao_curve(d, alpha, beta)]))
    assert f["points"] == 40  # d = 0 is left out (log 0)
    assert f["alpha"] == pytest.approx(alpha, abs=1e-10) and f["beta"] == pytest.approx(beta, abs=1e-10)
    # the peak: where dR/dd = alpha - beta (log d + 1) = 0, worth beta d*
    assert f["peak_d"] == pytest.approx(math.exp(alpha / beta - 1), rel=1e-9)
    grid = np.linspace(1e-3, 50, 200001)
    curve = gao_curve(grid, alpha, beta)
    assert grid[np.argmax(curve)] == pytest.approx(f["peak_d"], abs=1e-3)
    assert f["peak"] == pytest.approx(curve.max(), rel=1e-6)
    assert f["r2"] == pytest.approx(1.0)


def test_fit_with_noise_and_without_a_peak():
    rng = np.random.default_rng(0)
    d = np.repeat(np.linspace(0.2, 5.0, 25), 3)
    noisy = fit_gao(d, gao_curve(d, 0.8, 0.4) + rng.normal(0, 0.02, d.shape))
    assert noisy["alpha"] == pytest.approx(0.8, abs=0.05) and noisy["beta"] == pytest.approx(0.4, abs=0.03)
    rising = fit_gao(d, 0.7 * d)  # proportional to d: beta = 0, no peak
    assert rising["beta"] == pytest.approx(0.0, abs=1e-9)
    assert rising["peak_d"] is None and rising["peak"] is None
    assert fit_gao([0.0, 1.0], [0.0, 1.0])["alpha"] is None  # one usable point: no fit


def _runs(gold_of_d, proxy_of_d, seeds=3, n=30, noise=0.01):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(seeds):
        d = np.linspace(0, 6, n)
        out.append([{"iteration": 5 * i, "d": float(x), "gold": float(gold_of_d(x) + rng.normal(0, noise)),
                     "proxy": float(proxy_of_d(x) + rng.normal(0, noise))} for i, x in enumerate(d)])
    return out


def test_peak_and_fall_criterion():
    peaked = peak_and_fall(_runs(lambda d: float(gao_curve(np.array([d]), 0.6, 0.5)[0]), lambda d: d))
    assert peaked["peaks_and_falls"]
    assert peaked["peak_d"] == pytest.approx(math.exp(0.6 / 0.5 - 1), abs=0.3)
    assert peaked["gold_fall"]["mean"] > 0 and peaked["proxy_rise"]["mean"] > 0
    assert not peak_and_fall(_runs(lambda d: 0.2 * d, lambda d: d))["peaks_and_falls"]  # gold still rising
    assert not peak_and_fall(_runs(lambda d: float(gao_curve(np.array([d]), 0.6, 0.5)[0]),
                                   lambda d: -d))["peaks_and_falls"]  # proxy falling too


def test_quick_mode_end_to_end_and_resume(tmp_path):
    out = tmp_path / "oo" / "overoptimization.json"
    cache = tmp_path / "cache"
    run_module("benchmarks.overoptimization", "--quick", "--no-progress", "--out", out,
               "--cache-dir", cache, timeout=600)
    s = json.loads(out.read_text())
    assert s["finished_runs"] == s["planned_runs"] == 4 and s["missing"] == []
    keys = {(x["backend"], x["rm_pairs"], x["kl_coef"]) for x in s["settings"]}
    assert keys == {(b, 32, k) for b in ("jax", "torch") for k in (0.0, 0.2)}
    for x in s["settings"]:
        assert isinstance(x["rm_pairs"], int) and isinstance(x["kl_coef"], float)
        assert len(x["runs"]) == 1  # one seed
        points = x["runs"][0]
        assert [p["iteration"] for p in points] == [0, 2, 4]
        for p in points:
            assert set(p) == {"iteration", "d", "proxy", "gold"}
            assert p["d"] >= 0 and -1.0 <= p["gold"] <= 1.0 and math.isfinite(p["proxy"])
        assert points[0]["d"] == 0.0  # before the first update the policy is its initialisation
        for k in ("alpha", "beta", "peak_gold", "peak_d"):
            assert k in x and (x[k] is None or math.isfinite(x[k]))
    assert [p["pairs"] for p in s["proxies"]] == [32]
    assert "| jax | 32 | 0 |" in out.with_suffix(".md").read_text()
    for png in ("overoptimization.png", "overoptimization-kl.png"):
        assert (out.parent / png).stat().st_size > 1000
    # a rerun finds every run cached and only rebuilds the outputs
    again = run_module("benchmarks.overoptimization", "--quick", "--no-progress", "--out", out,
                       "--cache-dir", cache, timeout=600)
    assert "4 of 4 runs cached" in again.stderr
    assert json.loads(out.read_text())["settings"] == s["settings"]


def test_a_fitted_peak_beyond_the_data_is_not_reported_as_a_peak():
    """With a strong KL penalty the gold gain is still rising at the end (beta ~ 0): the fitted
    d* = exp(alpha/beta - 1) then lies anywhere beyond the data (1e100 in the real study). The
    setting's peak and the per-seed peak spread must say "no peak in the data", not a number."""
    from benchmarks.overoptimization import summarize_setting

    def record(seed, slope, bend):
        d = np.linspace(0.0, 1.8, 20)
        return {"seed": seed, "wall_s": 1.0, "points": [
            {"iteration": i, "d": float(x), "proxy": float(x), "gold": float(-0.3 + slope * x - bend * x * x)}
            for i, x in enumerate(d)]}

    rising = summarize_setting("jax", 1000, 0.2, [record(s, 0.25 + 0.01 * s, 0.001 * s) for s in range(3)])
    assert not rising["peak_in_range"]
    assert rising["seed_fits"]["peak_d"]["n"] == 0 and rising["seed_fits"]["peak_gold"]["mean"] is None
    assert rising["seed_fits"]["alpha"]["n"] == 3  # the fits themselves are kept
    peaked = summarize_setting("jax", 1000, 0.0, [record(s, 0.6, 0.3 + 0.01 * s) for s in range(3)])
    assert peaked["peak_in_range"] and peaked["seed_fits"]["peak_d"]["n"] == 3
