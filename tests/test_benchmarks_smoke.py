"""The benchmark harnesses' quick modes run and write what they promise (no timing asserts: speed
targets live in benchmarks/, not in tests)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_module


def test_benchmark_quick_mode_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "quick.json"
    run_module("benchmarks.run", "--quick", "--out", out, "--cache-dir", tmp_path / "ckpts", timeout=900)
    summary = json.loads(out.read_text())
    assert summary["machine"]["usable_cores"] >= 1
    assert summary["peak"]["peak_gflops"] > 0
    results = summary["results"]
    assert {(r["model"], r["program"]) for r in results} == {
        (m, p) for m in ("demo", "tiny1m") for p in ("ppo_jax", "ppo_torch")}
    for r in results:
        assert "error" not in r, r["error"]
        assert r["iteration_s"] > 0 and r["tokens_per_s"] > 0
        # tokens/s is whole-iteration throughput: B x (prompt + response) tokens per iteration
        wl = r["config"]["workload"]
        expected = wl["batch"] * (wl["prompt_len"] + wl["response_len"]) / r["iteration_s"]
        assert abs(r["tokens_per_s"] - expected) <= 1e-6 * expected
        for phase in ("generation", "forward", "update"):
            assert r["phases"][phase]["median_s"] > 0, (r["program"], phase)
            assert 0 < r["phases"][phase]["fraction_of_peak"], (r["program"], phase)
        if r["program"] == "ppo_jax":
            assert r["compilations"]["warmup"] > 0
            assert r["compilations"]["timed"] == 0  # nothing recompiles after the first iteration
    table = out.with_suffix(".md").read_text()
    assert "| tiny1m | ppo_jax |" in table and "| demo | ppo_torch |" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_benchmark_passes_remat_and_unroll_to_our_programs_only(tmp_path, monkeypatch):
    """benchmarks.run's command lines (the subprocess is not started): --remat / --scan-unroll
    reach our programs (benchmarks.ours records the trainer's own settings: the kernels test
    below runs one), not the peers."""
    import argparse
    import subprocess

    from benchmarks import run as bench_run

    cmds = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: cmds.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "not run"))
    monkeypatch.setitem(bench_run.PEERS, "trl", tmp_path)  # "set up", so that its command is built
    for remat, unroll in (("dots", True), ("none", False)):
        args = argparse.Namespace(iterations=1, warmup=1, scan_unroll=unroll, remat=remat, cache_dir=None,
                                  timeout=1)
        for program in ("jax", "torch", "trl"):
            assert "error" in bench_run.run_program(program, "demo", args, tmp_path / "r.json")
    jax_dots, torch_dots, trl_dots, jax_none, torch_none, trl_none = (" ".join(map(str, c)) for c in cmds)
    for cmd in (jax_dots, torch_dots):
        assert "--remat dots" in cmd and "--scan-unroll" in cmd
    for cmd in (jax_none, torch_none, trl_dots, trl_none):
        assert "--remat" not in cmd and "--scan-unroll" not in cmd


def test_rm_accuracy_quick_mode_reports_both_backends_against_the_ceiling(tmp_path):
    out = tmp_path / "rm.json"
    run_module("benchmarks.rm_accuracy", "--quick", "--no-progress", "--out", out,
               "--cache-dir", tmp_path / "cache", timeout=900)
    summary = json.loads(out.read_text())
    assert [r["backend"] for r in summary["results"]] == ["jax", "torch"]
    for r in summary["results"]:
        assert r["noise_ceiling"] == summary["eval_noise_ceiling"]
        assert r["eval_pairs"] == 32 and r["steps"] == 4  # 64 pairs, batch 16, one epoch
        for key in ("eval_accuracy", "eval_expected_accuracy", "train_accuracy"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
        assert r["eval_expected_accuracy"] <= r["noise_ceiling"]
        assert "train-rm --backend " + r["backend"] in r["command"]
    assert "| jax |" in out.with_suffix(".md").read_text()


def test_scale_tiny_and_gpu_tiny_suites_run_both_backends(tmp_path):
    """benchmarks.scale: the CPU suite's code (remat + chunking off and on, one process per run)
    and the GPU suite's (bf16 compute, minibatches, MFU and roofline figures) on a tiny shape."""
    from benchmarks.scale import update_flops

    cache = tmp_path / "ckpts"
    for suite, configs in (("tiny", {"off", "on"}), ("gpu-tiny", {"on"})):
        out = tmp_path / f"scale-{suite}.json"
        plan = ("--plan",) if suite == "tiny" else ()
        run_module("benchmarks.scale", "--suite", suite, "--out", out, "--cache-dir", cache, *plan, timeout=900)
        s = json.loads(out.read_text())
        assert {(r["backend"], r["config"]) for r in s["results"]} == {
            (b, c) for b in ("jax", "torch") for c in configs}
        for r in s["results"]:
            assert "error" not in r, r
            assert r["iteration_s"] > 0 and r["load_s"] > 0 and r["peak_rss_gib"] >= r["rss_built_gib"] > 0
            assert set(r["phases_s"]) >= {"generation", "forward", "update"}
            if r["config"] == "on":
                assert (r["remat"], r["logprob_chunk"]) == ("full", 16)
            if plan and r["backend"] == "jax":  # the run's own plan beside its measured RSS
                assert "plan_error" not in r, r
                assert 0 < r["plan_resident_gib"] < r["plan_peak_gib"] < r["peak_rss_gib"]
                assert r["plan_vs_peak_rss"] == r["plan_peak_gib"] / r["peak_rss_gib"]
            else:
                assert "plan_peak_gib" not in r
            if suite == "gpu-tiny":
                assert r["mfu_update"] > 0 and r["decode_hbm"] > 0
                upd = r["phases_s"]["update"]
                assert abs(r["update_tflops"] - update_flops("tiny", 8, 16, 8, 1) / upd / 1e12) < 1e-9
        assert "| jax | on |" in out.with_suffix(".md").read_text()
        assert ("plan_vs_peak_rss" in out.with_suffix(".md").read_text()) == bool(plan)


def test_supervised_step_reports_each_backend_and_the_jax_scratch_size(tmp_path):
    out = tmp_path / "sft-step.json"
    run_module("benchmarks.supervised_step", "--steps", "1", "--remat", "full", "--scan-unroll", "on",
               "--out", out, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["remat"], r["scan_unroll"]) for r in rows] == [("jax", "full", True),
                                                                           ("torch", "full", True)]
    for r in rows:
        assert r["step_ms"] > 0 and r["minor_faults"] >= 0 and r["sys_ms"] >= 0
    assert rows[0]["temp_mb"] > 0 and "temp_mb" not in rows[1]


def test_kernel_spans_end_when_the_thunk_executor_marks_them_done():
    from types import SimpleNamespace as E

    from benchmarks.kernels import kernel_spans, kind_of

    thread_a = [E(name="dot.1", start_ns=0, duration_ns=5, stats=[("hlo_op", "dot.1"), ("_p", 7)]),
                E(name="copy.2", start_ns=6, duration_ns=3, stats=[("hlo_op", "copy.2"), ("_p", 8)]),
                E(name="end: copy.2", start_ns=9, duration_ns=1, stats=[("_c", 8)]),
                E(name="ThunkExecutor::Execute", start_ns=0, duration_ns=50, stats=[])]
    thread_b = [E(name="end: dot.1", start_ns=100, duration_ns=1, stats=[("_c", 7)])]  # async: done later
    assert sorted(kernel_spans([thread_a, thread_b])) == [(0, 101, "dot.1"), (6, 10, "copy.2")]
    assert [kind_of(n) for n in ("ynn_fusion.12", "fusion.1.2", "dot", "copy_bitcast_fusion.44")] == [
        "ynn_fusion", "fusion", "dot", "copy_bitcast_fusion"]


def test_wall_shares_split_each_instant_among_the_running_kernels():
    from benchmarks.kernels import wall_shares

    spans = [(0, 30, "while.1"), (2, 20, "while.2"), (5, 10, "ynn_fusion.3"), (8, 12, "dot.4"),
             (35, 50, "copy.5")]  # runs past the window: clipped
    shares, idle = wall_shares(spans, 0, 40)
    # ynn alone 5-8, shared with the dot 8-10; the dot alone 10-12; the loops when nothing in
    # them runs (0-2 and 20-30 the outer, 2-5 and 12-20 the inner); nothing 30-35
    assert shares == {"ynn_fusion": 4, "dot": 3, "while": 23, "copy": 5} and idle == 5
    assert sum(shares.values()) + idle == 40


def test_kernels_charges_each_phase_its_xla_kernels(tmp_path):
    """benchmarks.kernels on the demo shape: every phase of the iteration is in the trace, the
    update's wall time is split among its kernels (its dots among them) and what is left."""
    out = tmp_path / "kernels.json"
    run_module("benchmarks.kernels", "--model", "demo", "--iterations", "1", "--remat", "dots",
               "--out", out, "--cache-dir", tmp_path / "ckpts", timeout=600)
    result = json.loads(out.read_text())
    assert result["remat"] == "dots"  # as the trainer was configured (benchmarks.ours.build_trainer)
    phases = result["phases"]
    assert {"time/generate_s", "time/forward_s", "time/update_s"} <= set(phases)
    update = phases["time/update_s"]
    assert update["wall_s"] > 0
    assert update["kernels"]["ynn_fusion"]["s"] > 0 and update["kernels"]["ynn_fusion"]["calls"] > 0
    for name, ph in phases.items():
        total = sum(k["s"] for k in ph["kernels"].values()) + ph["no_kernel_s"]
        assert all(k["s"] >= 0 for k in ph["kernels"].values()), name
        assert abs(total - ph["wall_s"]) < 1e-6, name
    assert update["no_kernel_s"] < 0.7 * update["wall_s"]  # the update's kernels were found in it
    assert "| ynn_fusion |" in out.with_suffix(".md").read_text()


def test_annotate_scale_quick_mode_counts_every_acknowledged_answer(tmp_path):
    out = tmp_path / "annotate"
    run_module("benchmarks.annotate_scale", "--quick", "--out", out, timeout=300)
    r = json.loads(out.with_suffix(".json").read_text())
    start, late = r["phases"]["start"], r["phases"]["late"]
    assert start["errors"] == 0 and late["errors"] == 0
    assert start["answers"] > 0 and start["stored_answers_after"] == start["answers"]
    # the second phase starts with (at least) 1,800 of 2,000 items done: at most 200 more answers
    before = max(1800, start["answers"])
    assert 0 < late["answers"] <= 2000 - before and late["stored_answers_after"] == before + late["answers"]
    assert start["p50_ms"] <= start["p99_ms"] and start["answers_per_s"] > 0
    assert "| start (0 done) |" in out.with_suffix(".md").read_text()


def test_estimators_quick_mode_has_every_estimator_and_backend_with_finite_numbers(tmp_path):
    """benchmarks.estimators: each kind of estimator run -- PPO (the others' baseline), a group
    estimator (G samples per prompt) and a critic-free one without groups; the six estimators'
    own arithmetic is the parity tests' -- in both backends, the same responses per iteration for
    each (S prompts x 1, or S / G prompts x G), finite evaluation points, the table and figure; a
    rerun finds every run cached."""
    import math

    from benchmarks.estimators import GROUPED

    ESTIMATORS = ("gae", "grpo", "reinforce_pp")
    out, cache = tmp_path / "est.json", tmp_path / "cache"
    args = ("benchmarks.estimators", "--quick", "--iterations", "1", "--pretrain-steps", "5", "--eval-prompts", "4",
            "--estimators", ",".join(ESTIMATORS), "--no-progress", "--out", out, "--cache-dir", cache)
    env = {"PPO_RLHF_COMPILE_CACHE": str(tmp_path / "xla")}
    run_module(*args, env=env, timeout=600)
    s = json.loads(out.read_text())
    assert s["finished_runs"] == s["planned_runs"] == 6 and not s["missing"]
    by = {(x["estimator"], x["backend"]): x for x in s["settings"]}
    assert set(by) == {(e, b) for e in ESTIMATORS for b in ("jax", "torch")}
    for (e, b), x in by.items():
        g = 2 if e in GROUPED else 1
        assert (x["prompts_per_iteration"], x["num_generations"], x["samples_per_iteration"]) == (8 // g, g, 8)
        (run,) = x["runs"]
        assert [p["iteration"] for p in run] == [0, 1] and [p["samples"] for p in run] == [0, 8]
        for p in run:
            for key in ("gold", "proxy", "kl", "train_s"):
                assert math.isfinite(p[key]), (e, b, key, p)
            assert -1.0 <= p["gold"] <= 1.0
        assert run[1]["train_s"] > 0
        for key in ("final_gold", "final_kl", "gold_at_kl_budget", "gold_at_time_budget"):
            assert math.isfinite(x[key]["mean"]), (e, b, key)
        assert ("vs_ppo" in x) == (e != "gae")
        if e == "gae":  # PPO's own mean curve ends at its final gold: it reaches it, at the latest at the end
            assert 0 <= x["samples_to_ppo_final"] <= 8
    table = out.with_suffix(".md").read_text()
    assert "| jax | " in table and "| torch | " in table and "GRPO | 4 x 2 |" in table
    # pooled over the backends: each estimator's runs of both, the final gold their mean
    pooled = {p["estimator"]: p for p in s["pooled"]}
    assert set(pooled) == set(ESTIMATORS) and all(p["runs"] == 2 for p in pooled.values())
    for e, p in pooled.items():
        finals = [by[e, b]["runs"][0][-1]["gold"] for b in ("jax", "torch")]
        assert abs(p["final_gold"]["mean"] - sum(finals) / 2) < 1e-12
        assert ("vs_ppo" in p) == (e != "gae")
    assert "Pooled over both backends" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    again = run_module(*args, env=env, timeout=300)
    assert "6 of 6 runs cached" in again.stderr


def test_estimators_on_a_verifiable_task_take_the_demos_settings_for_that_task():
    """`--task arithmetic`: the study trains with the demo's settings for the task (one source:
    DemoConfig.for_task), longer and on the demo's 400 evaluation samples; its outputs do not
    overwrite the reviews study's; a flag still overrides; the reviews defaults are untouched."""
    from benchmarks.estimators import DEFAULT_OUT, Study, default_out, parse
    from ppo_rlhf.app.demo import DemoConfig

    demo = DemoConfig.for_task("arithmetic")
    _, s = parse(["--task", "arithmetic"])
    assert (s.task, s.pretrain_steps, s.eval_prompts, s.kl_coef) == (
        "arithmetic", demo.pretrain_steps, demo.eval_prompts, demo.ppo["kl_coef"])
    for key in ("learning_rate", "ppo_epochs", "num_minibatches", "max_new_tokens", "max_prompt_len", "temperature"):
        assert s.ppo[key] == demo.ppo[key], key
    assert s.config("grpo", 0)["batch_size"] * s.num_generations == s.samples
    _, s2 = parse(["--task", "arithmetic", "--lr", "3e-4", "--iterations", "7"])
    assert (s2.ppo["learning_rate"], s2.iterations) == (3e-4, 7)
    assert parse([])[1] == Study() and Study().ppo["learning_rate"] != demo.ppo["learning_rate"]
    assert s.run_key() != Study().run_key()
    assert (default_out("reviews"), default_out("arithmetic")) == (
        DEFAULT_OUT, DEFAULT_OUT.with_name("estimators-arithmetic.json"))


def test_scale_group_configs_keep_the_rollout_size():
    """benchmarks.scale's GRPO configs sample batch / G prompts x G responses: the same rollout
    as PPO's, so the rows compare like for like; a G that does not divide the batch is refused."""
    from benchmarks.scale import CONFIGS, SUITES, config_fields
    from ppo_rlhf import PPOConfig

    for suite in ("cpu", "tiny"):
        ppo, grpo = (PPOConfig(**config_fields(SUITES[suite], c)) for c in ("on", "on-grpo4"))
        assert (grpo.advantage_estimator, grpo.num_generations) == ("grpo", 4)
        assert grpo.rollout_size == ppo.rollout_size == SUITES[suite]["batch"] and grpo.batch_size * 4 == ppo.batch_size
    with pytest.raises(SystemExit, match="divide"):
        config_fields(dict(SUITES["tiny"], batch=6), "on-grpo4")
    assert CONFIGS["off-grpo4"]["num_generations"] == 4
