"""PPO at the size users train: a Qwen2.5-0.5B-shaped model (issue 16), in both backends, with
activation checkpointing and chunked log-probs on and off -- on this CPU, or on a GPU.

    python -m benchmarks.scale                              # CPU: the 0.5B shape, both backends
    python -m benchmarks.scale --suite gpu                  # one GPU: bf16 compute, verl's scale
    python -m benchmarks.scale --suite tiny                 # seconds: the same code on a tiny shape (CI)
    python -m benchmarks.scale --suite gpu-tiny             # seconds: the gpu suite's code on CPU (CI)
    python -m benchmarks.scale --backends jax --configs off --iterations 2
    python -m benchmarks.scale --configs off,off-frozen-bf16 --plan   # + the plan of each jax run

What it builds, offline: a random-weight Qwen2 checkpoint of the shape (`SHAPES`: 24 layers,
hidden 896, intermediate 4864, 14 query / 2 KV heads, vocab 151,936, tied embeddings: 494M
parameters) and a reward model (the same trunk + a scalar head), cached under --cache-dir. PPO
runs as users run it: the default separate critic initialised from the reward model, the frozen
reference, one epoch of one minibatch (cpu) per iteration, prompts of random token ids
without padding and fixed-length responses (no EOS id), so every iteration does the same work.

Each (backend, config) runs in its own process (peak RSS is per process) and reports
  load_s          trainer construction (reading the checkpoints, building policy, reference,
                  critic, reward model and the optimiser state)
  rss_built_gib   resident memory right after construction (weights + optimiser state)
  compile_s       first iteration - median iteration (JAX: XLA compilation; torch: warm-up)
  iteration_s     median seconds per iteration, and per phase (generation, forward, update, ...)
  peak_rss_gib    the process's peak resident memory; above_built_gib = peak - built: the
                  activations, logits and temporaries of an iteration
  tokens_per_s    (prompt + response tokens of the batch) / iteration_s
  mfu_update      (gpu suite) the update's model FLOPs / its time / the card's bf16 peak
                  (--peak-tflops, default: H100/H200 SXM dense bf16, 989 TFLOP/s)
  decode_hbm      (gpu suite) weight bytes read per decode step / step time / HBM bandwidth
                  (--hbm-tbps, default 4.8 TB/s, H200)
Configs (--configs): "off" = remat none, logprob_chunk 0; "on" = remat full, logprob_chunk 16
(see PPOConfig.remat / logprob_chunk); "remat", "chunk" = one of the two; "off-critic-free",
"on-critic-free" = the same with advantage_estimator="reinforce_pp" (no critic: what dropping it
saves in memory and time, at the same rollout); "off-grpo4", "on-grpo4" = GRPO with 4 responses
per prompt (batch / 4 prompts x 4: the same rollout size, no critic); "off-frozen-bf16", "on-frozen-bf16" = the
reference and reward model stored in bf16 (PPOConfig.frozen_dtype).

--plan: each jax run is also planned by `ppo-rlhf plan --topology cpu` (same checkpoints, same
config fields: `config_fields`), in its own process after the run; the table adds the planned
resident state and iteration peak and their ratio to the run's measured peak RSS (the plan counts
the arrays XLA holds, not the process: Python, the libraries and the compiled code are the rest).

Results: a JSON file (--out, default benchmarks/results/scale-<suite>.json) and a markdown table
next to it. Measure on a quiet machine; the table records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import compile_every_program

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's architecture (config.json of the published model), random weights
    "qwen0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                     max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
    # the same code path in seconds (CI)
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True),
}

SUITES: dict[str, dict[str, Any]] = {
    # this 2-core, 24 GiB CPU machine: the workload (4 x (32 + 32) tokens, one epoch)
    "cpu": dict(shape="qwen0.5b", batch=4, prompt_len=32, response_len=32, ppo_epochs=1,
                minibatches=1, iterations=2, compute_dtype=None, configs=("off", "on")),
    # one GPU: verl's single-GPU Qwen2.5-0.5B PPO example's scale, bf16 compute
    "gpu": dict(shape="qwen0.5b", batch=128, prompt_len=512, response_len=512, ppo_epochs=1,
                minibatches=4, iterations=3, compute_dtype="bfloat16", configs=("on",)),
    "tiny": dict(shape="tiny", batch=4, prompt_len=8, response_len=8, ppo_epochs=1,
                 minibatches=1, iterations=2, compute_dtype=None, configs=("off", "on")),
    # the gpu suite's code path (bf16 compute, minibatches, MFU / roofline figures) in seconds:
    # what CI runs on CPU so that the GPU command is known to work before a GPU is there
    "gpu-tiny": dict(shape="tiny", batch=8, prompt_len=8, response_len=8, ppo_epochs=1,
                     minibatches=2, iterations=2, compute_dtype="bfloat16", configs=("on",)),
}

CONFIGS = {"off": dict(remat="none", logprob_chunk=0), "on": dict(remat="full", logprob_chunk=16),
           "remat": dict(remat="full", logprob_chunk=0), "chunk": dict(remat="none", logprob_chunk=16),
           # critic-free (REINFORCE++: one response per prompt, the same rollout as PPO's, no critic)
           "off-critic-free": dict(remat="none", logprob_chunk=0, advantage_estimator="reinforce_pp"),
           "on-critic-free": dict(remat="full", logprob_chunk=16, advantage_estimator="reinforce_pp"),
           # GRPO with G = 4 responses per prompt: batch / 4 prompts x 4, the same rollout size
           # (config_fields divides batch_size by num_generations), no critic
           "off-grpo4": dict(remat="none", logprob_chunk=0, advantage_estimator="grpo", num_generations=4),
           "on-grpo4": dict(remat="full", logprob_chunk=16, advantage_estimator="grpo", num_generations=4),
           # the frozen models (reference, reward model) stored in bf16 (PPOConfig.frozen_dtype)
           "off-frozen-bf16": dict(remat="none", logprob_chunk=0, frozen_dtype="bfloat16"),
           "on-frozen-bf16": dict(remat="full", logprob_chunk=16, frozen_dtype="bfloat16"),
           # LoRA rank 16 (alpha 32, peft's usual 2 x rank) on the policy and the critic, every
           # projection: only the adapters (and the critic's head) trained, the reference = the
           # policy with its adapters off (no copy)
           "off-lora16": dict(remat="none", logprob_chunk=0, lora_rank=16, lora_alpha=32.0,
                              lora_roles=("policy", "critic")),
           "on-lora16": dict(remat="full", logprob_chunk=16, lora_rank=16, lora_alpha=32.0,
                             lora_roles=("policy", "critic"))}

PHASES = {"time/generate_s": "generation", "time/forward_s": "forward", "time/reward_s": "reward",
          "time/advantages_s": "advantages", "time/update_s": "update"}


def _rss_gib() -> float:
    """Current resident memory of this process (GiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_checkpoints(shape: str, cache: Path) -> tuple[Path, Path]:
    """A random Qwen2 policy of `shape` and a reward model (the same trunk, a fresh scalar head),
    written once under `cache` (float32 safetensors)."""
    policy, rm = cache / f"{shape}-policy", cache / f"{shape}-rm"
    if not (policy / "config.json").exists() or not (rm / "config.json").exists():
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from ppo_torch.models import save_pretrained, scalar_model_from_lm

        torch.manual_seed(0)
        cfg = Qwen2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=0,
                          use_sliding_window=False)
        for d in (policy, rm):
            d.mkdir(parents=True, exist_ok=True)
        Qwen2ForCausalLM(cfg).save_pretrained(str(policy), safe_serialization=True)
        save_pretrained(scalar_model_from_lm(str(policy), seed=1), rm)
    return policy, rm


def model_params(shape: str) -> dict[str, float]:
    """Parameter counts of the shape: matmul parameters of the trunk (per token: 2 FLOPs each in a
    forward) and of the LM head."""
    s = SHAPES[shape]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * d
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * i  # q, o, k, v, gate/up/down
    return {"trunk": L * per_layer, "lm_head": h * V, "layers": L, "hidden": h}


def update_flops(shape: str, batch: int, seq: int, response: int, epochs: int) -> float:
    """Model FLOPs of the update: policy (trunk over the sequence, LM head over the response
    positions) and critic (trunk), forward + backward = 3 x forward, per epoch; attention's
    score/value matmuls included (causal: half of the full square)."""
    p = model_params(shape)
    tokens = batch * seq
    attn = 2 * 2 * p["layers"] * batch * seq * seq * p["hidden"] / 2  # QK^T and PV, causal
    policy = 2 * p["trunk"] * tokens + 2 * p["lm_head"] * batch * response + attn
    critic = 2 * p["trunk"] * tokens + attn
    return 3.0 * (policy + critic) * epochs


# ---- one (backend, config) in this process --------------------------------------------------------
class _Tokenizer:
    """What the trainers read from a tokenizer when fed token ids (no tokenizer files here)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.pad_token_id, self.eos_token_id = vocab_size, 0, None

    def __len__(self) -> int:
        return self.vocab_size


def config_fields(suite: dict[str, Any], config: str) -> dict[str, Any]:
    """The PPOConfig fields of a (suite, config) run: what the child trains with and what `--plan`
    hands `ppo-rlhf plan` (one list, so the plan is of the run it is compared with). A config with
    num_generations G samples batch / G prompts x G responses: the rollout stays `batch` responses."""
    g = CONFIGS[config].get("num_generations", 1)
    if suite["batch"] % g:
        raise SystemExit(f"config {config}: num_generations {g} must divide the suite's batch {suite['batch']}")
    return dict(batch_size=suite["batch"] // g, max_prompt_len=suite["prompt_len"],
                max_new_tokens=suite["response_len"], ppo_epochs=suite["ppo_epochs"],
                num_minibatches=suite["minibatches"], learning_rate=1e-6, kl_coef=0.05, seed=0,
                compute_dtype=suite["compute_dtype"], **CONFIGS[config])


def child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from ppo_rlhf import PPOConfig

    suite = SUITES[args.suite]
    shape = suite["shape"]
    policy, rm = make_checkpoints(shape, Path(args.cache_dir))
    rss0 = _rss_gib()
    cfg = PPOConfig(**config_fields(suite, args.config))
    kw = dict(config=cfg, eos_token_id=None, pad_token_id=0,
              tokenizer=_Tokenizer(SHAPES[shape]["vocab_size"]))
    t0 = time.perf_counter()
    if args.backend == "jax":
        import jax

        from ppo_jax.ppo import PPOTrainer

        trainer = PPOTrainer(str(policy), str(rm), **kw)
        jax.block_until_ready(trainer.params)
        device = str(jax.devices()[0].device_kind)
    else:
        import torch

        from ppo_torch.ppo import PPOTrainer

        trainer = PPOTrainer(str(policy), str(rm), device="cuda" if torch.cuda.is_available() else "cpu",
                             **kw)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    load_s = time.perf_counter() - t0
    built = _rss_gib()
    rng = np.random.default_rng(0)
    B, P = cfg.batch_size, suite["prompt_len"]  # prompts; cfg.rollout_size responses (= suite["batch"])
    times, phases = [], []
    for i in range(args.iterations or suite["iterations"]):
        q = rng.integers(2, SHAPES[shape]["vocab_size"], size=(B, P)).astype(np.int32)
        t = time.perf_counter()
        stats = trainer.step(i, query_ids=q, query_mask=np.ones_like(q))
        times.append(time.perf_counter() - t)
        phases.append({name: float(stats[k]) for k, name in PHASES.items() if k in stats})
        print(f"[scale] {args.backend}/{args.config} iteration {i}: {times[-1]:.2f} s", file=sys.stderr,
              flush=True)
    steady = times[1:] or times
    median = float(np.median(steady))
    out = {
        "backend": args.backend, "config": args.config, **CONFIGS[args.config], "device": device,
        "load_s": load_s, "compile_s": times[0] - median if len(times) > 1 else None,
        "iteration_s": median, "iterations_s": times,
        "phases_s": {k: float(np.median([p[k] for p in phases[1:] or phases])) for k in phases[0]},
        "rss_start_gib": rss0, "rss_built_gib": built, "peak_rss_gib": _peak_rss_gib(),
        "tokens_per_s": cfg.rollout_size * (P + suite["response_len"]) / median,
    }
    out["above_built_gib"] = out["peak_rss_gib"] - built
    if args.suite.startswith("gpu"):
        out.update(_gpu_figures(args, suite, shape, out))
    return out


def _gpu_figures(args: argparse.Namespace, suite: dict, shape: str, r: dict) -> dict[str, Any]:
    """MFU of the update and the decode's fraction of the HBM roofline (see the module docstring);
    GPU memory peak from the backend."""
    seq = suite["prompt_len"] + suite["response_len"]
    fl = update_flops(shape, suite["batch"], seq, suite["response_len"], suite["ppo_epochs"])
    upd = r["phases_s"].get("update")
    p = model_params(shape)
    weight_bytes = (p["trunk"] + p["lm_head"]) * 2  # bf16 weights read once per decode step
    gen = r["phases_s"].get("generation")
    out = {"update_tflops": fl / upd / 1e12 if upd else None,
           "mfu_update": fl / upd / (args.peak_tflops * 1e12) if upd else None,
           "decode_step_s": gen / suite["response_len"] if gen else None}
    if gen:
        out["decode_hbm"] = weight_bytes / (gen / suite["response_len"]) / (args.hbm_tbps * 1e12)
    try:
        if r["backend"] == "torch":
            import torch

            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            out["gpu_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    except Exception:  # a figure we may not get on every platform
        pass
    return out


# ---- the suite: one process per (backend, config) -------------------------------------------------
def plan_peak(suite: dict[str, Any], config: str, cache: Path, timeout: float) -> dict[str, Any]:
    """`ppo-rlhf plan --topology cpu` of the run (same models, same config fields), in its own
    process: the planned iteration peak and resident state (GiB) beside the run's measured RSS."""
    policy, rm = make_checkpoints(suite["shape"], cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "ppo_rlhf", "plan", "--model", str(policy),
               "--reward-model", str(rm), "--topology", "cpu", "--json", str(out)]
        for k, v in config_fields(suite, config).items():
            if v is not None:  # a tuple (lora_roles) as the CLI takes it: comma-separated
                cmd += ["--set", f"{k}={','.join(v) if isinstance(v, tuple) else v}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"plan_error": "timeout"}
        if proc.returncode not in (0, 1) or not out.exists():  # 1: planned, does not fit
            return {"plan_error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        plan = json.loads(out.read_text())
    return {"plan_peak_gib": plan["peak_bytes"] / 2**30,
            "plan_resident_gib": plan["resident_state_bytes"] / 2**30,
            "plan_s": time.perf_counter() - t}


def table(results: list[dict[str, Any]], suite: str) -> str:
    cols = ["backend", "config", "load_s", "compile_s", "iteration_s", "generation", "forward",
            "update", "rss_built_gib", "peak_rss_gib", "above_built_gib", "tokens_per_s"]
    if any("plan_peak_gib" in r for r in results):
        cols += ["plan_resident_gib", "plan_peak_gib", "plan_vs_peak_rss"]
    if suite.startswith("gpu"):
        cols += ["mfu_update", "decode_hbm", "gpu_peak_gib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['config']} | failed: {r['error']} |")
            continue
        row = []
        for c in cols:
            v = r.get(c, r.get("phases_s", {}).get(c))
            row.append(f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--backends", default="jax,torch", help="comma-separated (default: jax,torch)")
    p.add_argument("--configs", help=f"comma-separated of {', '.join(CONFIGS)} (default: the suite's)")
    p.add_argument("--iterations", type=int, help="PPO iterations per run (the first one compiles)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "ppo-rlhf-scale"))
    p.add_argument("--out", help="JSON file (default benchmarks/results/scale-<suite>.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="the card's HBM bandwidth, TB/s")
    p.add_argument("--plan", action="store_true",
                   help="also plan each jax run with `ppo-rlhf plan --topology cpu` (the same models "
                        "and config) and report the planned peak beside the measured peak RSS")
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "CONFIG"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    compile_every_program()  # compile time is measured here
    if args.child:
        args.backend, args.config = args.child
        r = child(args)
        Path(args.child_out).write_text(json.dumps(r, indent=2) + "\n")
        return [r]
    suite = SUITES[args.suite]
    configs = args.configs.split(",") if args.configs else list(suite["configs"])
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    out = Path(args.out) if args.out else HERE / "results" / f"scale-{args.suite}.json"
    make_checkpoints(suite["shape"], Path(args.cache_dir))  # once, outside the timed processes
    results = []
    for backend in args.backends.split(","):
        for config in configs:
            with tempfile.TemporaryDirectory() as tmp:
                res = Path(tmp) / "r.json"
                cmd = [sys.executable, "-m", "benchmarks.scale", "--suite", args.suite,
                       "--cache-dir", args.cache_dir, "--child", backend, config, "--child-out", str(res),
                       "--peak-tflops", str(args.peak_tflops), "--hbm-tbps", str(args.hbm_tbps)]
                if args.iterations:
                    cmd += ["--iterations", str(args.iterations)]
                print(f"[scale] {backend} / {config} ...", file=sys.stderr, flush=True)
                env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
                try:
                    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout,
                                          stdout=subprocess.PIPE, stderr=None, text=True)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                if rc == 0 and res.exists():
                    results.append(json.loads(res.read_text()))
                else:  # e.g. -9: killed by the out-of-memory killer
                    results.append({"backend": backend, "config": config, "error": f"exit {rc}"})
            if args.plan and backend == "jax":
                print(f"[scale] plan --topology cpu: {config} ...", file=sys.stderr, flush=True)
                r = results[-1]
                r.update(plan_peak(suite, config, Path(args.cache_dir), args.timeout))
                if "plan_peak_gib" in r and "peak_rss_gib" in r:
                    r["plan_vs_peak_rss"] = r["plan_peak_gib"] / r["peak_rss_gib"]
    summary = {"suite": args.suite, **suite, "configs": configs, "shape_config": SHAPES[suite["shape"]],
               "load_avg_at_end": os.getloadavg(), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = table(results, args.suite)
    out.with_suffix(".md").write_text(f"# benchmarks.scale --suite {args.suite}\n\n{md}")
    print(md)
    return results


if __name__ == "__main__":
    main()
