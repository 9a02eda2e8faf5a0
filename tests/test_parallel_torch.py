"""PyTorch DDP and FSDP2 (`ppo_torch/parallel.py`) against one process with the same global
batch: 2 ranks under `torchrun` with gloo on the CPU.

Each run (a subprocess: this file's `worker`) starts from the same tiny checkpoint and runs four
PPO iterations on the same prompts: two sampling with the seeded generator (each rank draws the
whole batch's noise and uses its rows), one with external Gumbel noise that makes rank 0's rows
end at their first token while rank 1's run on (the ranks leave generation at different steps:
under FSDP2 no collective may run per token, or this would hang), and one after a checkpoint --
saved (rank 0 writes, FSDP2 gathers first), loaded into a fresh trainer, which must then take
exactly the same step as the trainer it was saved from. The stats of every iteration, the saved
parameters, AdamW moments and Hugging Face policy are compared with the single-process run --
and again with LoRA on policy and critic (the saved policy is then a PEFT adapter, and the
frozen base weights must neither get gradients nor move).

Tolerances (float32), for reduction order only: each rank sums the loss and gradients of its
rows, the ranks' gradients are added by an all-reduce (DDP) or a reduce-scatter (FSDP2), so sums
run in another order than one process's (and 1 vs 2 OpenMP threads reorder matmul sums too).
Observed: weights <= 5e-7 apart after four iterations at lr = 1e-3 (they move by ~4e-3), AdamW
moments <= 2e-8; stats within 1e-6 relative except ratio maxima (~1e-6 relative of values ~8);
checked at 2e-6 absolute for weights and 2e-5 relative / 1e-5 absolute for stats. The clip
fractions may differ by one token flipping at the clip boundary in one step (see
tests/test_parallel_jax.py). The FSDP2 run also uses grad_accum_steps=2 (two micro-batches of its
rows per rank, one reduce-scatter per step): for token-mean losses that is the same sum again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
B, P, N, V = 8, 6, 8, 512
BASE = dict(batch_size=B, max_prompt_len=P, max_new_tokens=N, learning_rate=1e-3,
            temperature=0.9, ppo_epochs=2, num_minibatches=2)
WEIGHT_ATOL = 2e-6
STATS = dict(rtol=2e-5, atol=1e-5)
ONE_FLIP = 1.0 / (B // BASE["num_minibatches"] * N)  # one token of a step's minibatch


def reward_fn(prompts, responses):
    """A host-side reward (as in the parity test): distinct characters up, length down."""
    return [0.1 * len(set(r)) - 0.02 * len(r) for r in responses]


# ---- the subprocess (one process, or one rank under torchrun) -------------------------------------
RUNS = {"none": 1, "ddp": 1, "fsdp": 2}  # strategy -> grad_accum_steps


def _worker(strategies: list[str], ckpt: str, out: str, extra: dict | None = None) -> None:
    """Run the iterations for each strategy in turn (one torchrun job serves DDP then FSDP2:
    the second trainer joins the process group the first one created)."""
    from ppo_torch.parallel import shutdown

    for strategy in strategies:
        _iterations(strategy, ckpt, Path(out) / strategy, RUNS[strategy], extra or {})
    shutdown(exit_code=0)  # its results are written: exit without the interpreter's finalization


def _iterations(strategy: str, ckpt: str, out_dir: Path, accum: int, extra: dict) -> None:
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.sampling import gumbel_noise
    from ppo_rlhf.testing import EOS_ID, PAD_ID, make_padded_batch
    from ppo_torch.ppo import PPOTrainer

    config = PPOConfig(**BASE, grad_accum_steps=accum, **extra)

    def trainer():
        return PPOTrainer(ckpt, reward_fn, config=config, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                          device="cpu", distributed=None if strategy == "none" else strategy)

    def clean(s):
        return {k: v for k, v in s.items() if not k.startswith("time/")}

    t = trainer()
    res: dict = {"world": t.processes.count, "stats": []}
    frozen_before = _frozen(t)
    for it in range(3):
        q, qm, _, _ = make_padded_batch(100 + it, B, P, 1, vocab_size=V)
        noise = None
        if it == 2:  # rows 0 .. B/2 - 1 (rank 0's) emit EOS first; the others never do
            noise = gumbel_noise(7, B, N, V)
            noise[: B // 2, 0, EOS_ID] = 1e4
            noise[B // 2:, :, EOS_ID] = -1e4
        res["stats"].append(clean(t.step(it, query_ids=q, query_mask=qm, noise=noise)))
    t.save_checkpoint(out_dir / "ckpt")
    resumed = trainer()
    resumed.load_checkpoint(out_dir / "ckpt")
    q, qm, _, _ = make_padded_batch(103, B, P, 1, vocab_size=V)
    res["stats"].append(clean(t.step(3, query_ids=q, query_mask=qm)))
    res["resumed_step"] = clean(resumed.step(3, query_ids=q, query_mask=qm))
    t.save_checkpoint(out_dir / "final")
    frozen_after = _frozen(t)
    res["frozen_max_change"] = max((float((frozen_after[k] - v).abs().max()) for k, v in frozen_before.items()),
                                   default=0.0)
    res["frozen"] = len(frozen_before)
    res["frozen_with_grad"] = [n for m in (t.policy, t.critic) for n, p in m.named_parameters()
                               if not p.requires_grad and p.grad is not None]
    res["trained"] = sorted(f"{role}.{n}" for role, m in (("policy", t.policy), ("critic", t.critic))
                            for n, p in m.named_parameters() if p.requires_grad)
    res["optimised"] = sum(len(g["params"]) for g in t.optimizer.param_groups)
    if t.processes.is_main:
        (out_dir / "result.json").write_text(json.dumps(res))


def _frozen(t) -> dict:
    """The frozen parameters of policy and critic (with LoRA: the base weights), whole (FSDP2:
    gathered from the shards -- a collective every rank runs in the same order)."""
    out = {}
    for role, m in (("policy", t.policy), ("critic", t.critic)):
        for n, p in m.named_parameters():
            if not p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[f"{role}.{n}"] = full.detach().clone()
    return out


def _run(strategies: list[str], ckpt: Path, out: Path, extra: dict | None = None) -> dict[str, dict]:
    args = [__file__, "worker", ",".join(strategies), str(ckpt), str(out), json.dumps(extra or {})]
    cmd = ([sys.executable, *args] if strategies == ["none"] else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {s: json.loads((out / s / "result.json").read_text()) for s in strategies}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    ckpt = tiny_checkpoint("gpt2")
    return {**_run(["none"], ckpt, out), **_run(["ddp", "fsdp"], ckpt, out)}, out


def _check_stats(single: dict, dist: dict, what: str) -> None:
    assert set(single) == set(dist), set(single) ^ set(dist)
    for k in single:
        if "clipfrac" in k:
            assert abs(single[k] - dist[k]) <= ONE_FLIP + 1e-7, f"{what}: {k} {single[k]} vs {dist[k]}"
        else:
            np.testing.assert_allclose(dist[k], single[k], err_msg=f"{what}: {k}", **STATS)


def _max_abs(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)


def _checkpoint(path: Path) -> tuple[dict, dict, dict]:
    import torch
    from safetensors.numpy import load_file

    opt = torch.load(path / "state" / "optimizer.pt", weights_only=True)
    moments = {f"{i}.{k}": v.numpy() for i, s in opt["state"].items() for k, v in s.items()
               if k in ("exp_avg", "exp_avg_sq")}
    policy = path / "policy" / "model.safetensors"  # with LoRA: the PEFT adapter
    policy = policy if policy.is_file() else path / "policy" / "adapter_model.safetensors"
    return load_file(str(path / "state" / "model.safetensors")), moments, load_file(str(policy))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, strategy):
    _check_two_ranks(runs, strategy)


def _check_two_ranks(runs, strategy):
    results, out = runs
    single, dist = results["none"], results[strategy]
    single_dir, dist_dir = out / "none", out / strategy
    assert dist["world"] == 2 and single["world"] == 1
    for it, (a, b) in enumerate(zip(single["stats"], dist["stats"], strict=True)):
        _check_stats(a, b, f"{strategy} iteration {it}")
    # rank 0's rows all stopped at their first token in iteration 2, rank 1's ran to the end
    assert dist["stats"][2]["gen/eos_frac"] == 0.5
    # a trainer restored from the checkpoint takes exactly the step of the one that wrote it
    assert dist["resumed_step"] == dist["stats"][3]
    for name in ("ckpt", "final"):
        (w1, m1, p1), (w2, m2, p2) = _checkpoint(single_dir / name), _checkpoint(dist_dir / name)
        assert _max_abs(w1, w2) <= WEIGHT_ATOL, f"{name}: parameters differ by {_max_abs(w1, w2):.2e}"
        assert _max_abs(p1, p2) <= WEIGHT_ATOL, f"{name}: saved policies differ"
        assert _max_abs(m1, m2) <= WEIGHT_ATOL, f"{name}: AdamW moments differ"
    moved = _max_abs(_checkpoint(single_dir / "final")[2], _checkpoint(single_dir / "ckpt")[2])
    assert moved > 1e-4, "the update did not move the weights: the comparison would be vacuous"


# ---- LoRA: adapters on policy and critic, the base weights frozen --------------------------------
# DDP registers only the parameters that require grad (the frozen base is neither bucketed nor
# all-reduced); FSDP2 shards frozen and trained parameters of a unit together (mixed
# requires_grad) and reduce-scatters the adapters' gradients only. The reference is the policy
# with its adapters off (`adapters_disabled`), wrapped as the policy is. Same tolerances as above.
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_roles=["policy", "critic"],
            lora_targets=["q", "k", "v", "o", "up", "down"])


@pytest.fixture(scope="module")
def lora_runs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_runs")
    ckpt = tiny_checkpoint("gpt2")
    return {**_run(["none"], ckpt, out, LORA), **_run(["ddp", "fsdp"], ckpt, out, LORA)}, out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_lora_match_one_process(lora_runs, strategy):
    """With LoRA: stats, saved adapters (the PEFT dir), adapter AdamW moments and the resumed
    step as without; only the adapters and the critic's head are trained, no frozen parameter
    gets a gradient, and the base weights end where they started (on every strategy)."""
    _check_two_ranks(lora_runs, strategy)
    results, out = lora_runs
    single, dist = results["none"], results[strategy]
    for r in (single, dist):
        assert r["frozen"] > 0 and r["frozen_max_change"] == 0.0 and not r["frozen_with_grad"], r
        assert all(".lora_" in n or n == "critic.hf_model.score.weight" for n in r["trained"]), r["trained"]
        assert r["optimised"] == len(r["trained"])
    # FSDP2's parameter names differ from none's only where it inserts wrappers (it does not)
    assert dist["trained"] == single["trained"]
    assert (out / strategy / "final" / "policy" / "adapter_config.json").is_file()


def _cli_args(tiny_checkpoint, tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\nbrown fox\na good answer\nis short\nkind and\ntrue words\n")
    args = ["-m", "ppo_rlhf", "train", "--backend", "torch", "--policy",
            str(tiny_checkpoint("gpt2")), "--reward-fn", "tests.helpers:length_reward",
            "--prompts", str(prompts), "--no-progress", "--set", "batch_size=4", "--set",
            "max_new_tokens=6", "--set", "max_prompt_len=8", "--set", "ppo_epochs=2", "--set",
            "num_minibatches=2", "--set", "learning_rate=0.001", "--checkpoint-every", "1"]
    return args


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _cli(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


EXIT_PROBE = """
import atexit, sys
from ppo_torch.parallel import Distributed, shutdown
Distributed("fsdp")  # outside torchrun: a group of one
atexit.register(lambda: print("finalized"))
sys.stdout.write("saved, still in the buffer")
shutdown(exit_code=3)
print("after")
"""


def test_shutdown_leaves_the_group_then_exits_without_finalization():
    """A torchrun rank of the CLI ends with `shutdown(exit_code=...)`: the group left, output
    flushed, the status given, and nothing of the interpreter's finalization run (where gloo's
    still-referenced worker threads can abort the rank)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "saved, still in the buffer"


def test_torchrun_cli_logs_and_checkpoints_on_rank_0(tiny_checkpoint, tmp_path):
    """`torchrun -m ppo_rlhf train --backend torch` (DDP chosen by default under torchrun):
    rank 0 alone writes the metrics (one line per iteration), prints, saves the policy; the
    checkpoint is complete."""
    run = tmp_path / "run"
    proc = _cli(TORCHRUN + _cli_args(tiny_checkpoint, tmp_path) + ["--out", str(run), "--iterations", "2"])
    assert proc.stdout.count("policy saved to") == 1
    assert [json.loads(line)["iteration"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "iter_00000002"
    assert {p.name for p in (run / "checkpoints" / "iter_00000002" / "state").iterdir()} == \
        {"model.safetensors", "optimizer.pt"}
    assert (run / "policy" / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_cli_fsdp_matches_one_process_and_resumes(tiny_checkpoint, tmp_path):
    """The CLI with --distributed fsdp, interrupted after 2 iterations and resumed for a 3rd
    (every rank restores its shards from the rank-0 files), against one process."""
    args = _cli_args(tiny_checkpoint, tmp_path)
    _cli([sys.executable, *args, "--out", str(tmp_path / "one"), "--iterations", "3"])
    _cli(TORCHRUN + args + ["--distributed", "fsdp", "--out", str(tmp_path / "two"), "--iterations", "2"])
    _cli(TORCHRUN + args + ["--distributed", "fsdp", "--out", str(tmp_path / "two"),
                            "--iterations", "3", "--resume"])
    one, two = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert [r["iteration"] for r in two] == [0, 1, 2]
    for it, (a, b) in enumerate(zip(one, two)):
        _check_stats({k: v for k, v in a.items() if not k.startswith("time/")},
                     {k: v for k, v in b.items() if not k.startswith("time/")}, f"cli iteration {it}")
    assert (tmp_path / "two" / "checkpoints" / "LATEST").read_text().strip() == "iter_00000003"
    assert (tmp_path / "two" / "policy" / "model.safetensors").is_file()


def test_config_must_split_over_the_ranks():
    from ppo_rlhf import PPOConfig
    from ppo_rlhf.errors import UsageError
    from ppo_rlhf.runtime.processes import check_data_parallel

    check_data_parallel(PPOConfig(batch_size=8, num_minibatches=2, grad_accum_steps=2), 2, "x")
    with pytest.raises(UsageError, match=r"--distributed ddp over 4 ranks: the micro-batch"):
        check_data_parallel(PPOConfig(batch_size=8, num_minibatches=2, grad_accum_steps=2), 4,
                            "--distributed ddp over 4 ranks")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(sys.argv[2].split(","), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]) if sys.argv[5:] else None)
