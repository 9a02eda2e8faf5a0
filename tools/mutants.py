"""Mutation testing of the PPO math: do the parity and formula tests notice a planted bug?

    python tools/mutants.py                 # every mutant; exit 1 if any survives
    python tools/mutants.py --only NAME,... # some of them;  --list prints them

Each mutant is one small, plausible bug -- a mask dropped, a weight made equal, a temperature
forgotten, a sign flipped -- in the loss, masking, shaping, GAE, accumulation or temperature code
of one backend, of both (the same bug twice, which the JAX-vs-torch parity cannot see), or of the
shared host code. For each, the tool copies the working tree to a temporary directory, applies
the edit there (the checkout is never touched), runs the fast tests that should catch it
(`pytest -x`: the first failure ends the run) and reports KILLED (a test failed) or SURVIVED
(every test passed: the test suite has a hole there). A mutant whose text is not found is an
ERROR: the code moved and the list must follow it.

Run by the slow suite (tests/test_mutants.py); README "Parity" lists what it covers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PPO_PARITY = "parity_tests/test_ppo_parity.py"
REFERENCE = "parity_tests/test_ppo_reference.py"
MATH = "parity_tests/test_math_parity.py"
LORA = "tests/test_lora.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str                          # the bug it stands for
    edits: tuple[tuple[str, str, str], ...]   # (file, old text, new text), each old text unique
    tests: tuple[str, ...]            # pytest arguments that must catch it


MUTANTS = [
    Mutant("torch-loss-mask-dropped", "the training loss of one backend counts padding after EOS",
           (("ppo_torch/ppo.py", 'mask = mb["response_mask"]\n        pg_loss',
             'mask = torch.ones_like(mb["response_mask"])\n        pg_loss'),),
           (PPO_PARITY, "-k", "default")),
    Mutant("jax-loss-mask-dropped", "the same in the JAX trainer",
           (("ppo_jax/ppo.py", 'mask = mb["response_mask"]\n        pg_loss',
             'mask = jnp.ones_like(mb["response_mask"])\n        pg_loss'),),
           (PPO_PARITY, "-k", "default")),
    Mutant("torch-equal-microbatch-weights", "micro-batches weighted 1/A instead of by real tokens",
           (("ppo_torch/ppo.py", 'w = microbatch_weight(mb["response_mask"], cfg.loss_agg, total)',
             'w = torch.tensor(1.0 / cfg.grad_accum_steps)'),),
           (PPO_PARITY, "-k", "accum")),
    Mutant("both-equal-microbatch-weights", "the same bug in both backends' shared helper formula",
           (("ppo_torch/ppo.py", "return aggregation_count(mask, loss_agg) / total",
             "return torch.ones_like(total) / 2"),
            ("ppo_jax/ppo.py", "return aggregation_count(mask, loss_agg) / total",
             "return jnp.ones_like(total) / 2")),
           (REFERENCE, "-k", "reward-fn")),
    Mutant("both-reference-logprobs-without-temperature",
           "the reference's log-probs at temperature 1 while the policy's use T (negative KL, trl#2358)",
           (("ppo_torch/ppo.py",
             "ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=cfg.temperature,",
             "ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=1.0,"),
            ("ppo_jax/ppo.py", "ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=cfg.temperature,",
             "ref_logprobs = response_logprobs(ref, q, qm, r, rm, temperature=1.0,")),
           (REFERENCE, "-k", "reward-fn")),
    Mutant("jax-clip-flipped", "the clipped objective takes the optimistic (min) instead of the pessimistic term",
           (("ppo_jax/losses.py", "losses = jnp.maximum(unclipped, clipped)",
             "losses = jnp.minimum(unclipped, clipped)"),),
           (MATH, "-k", "policy_loss")),
    Mutant("torch-value-clip-flipped", "the clipped value loss takes the smaller term",
           (("ppo_torch/losses.py", "losses, clip_active = torch.maximum(unclipped, clipped), clipped > unclipped",
             "losses, clip_active = torch.minimum(unclipped, clipped), clipped > unclipped"),),
           (MATH, "-k", "value_loss")),
    Mutant("jax-gae-no-terminal-cut", "GAE bootstraps past the end of a response (V_{T+1} = V_T, not 0)",
           (("ppo_jax/advantages.py", "next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_real",
             "next_values = jnp.concatenate([values[:, 1:], values[:, -1:]], axis=1)"),),
           (MATH, "-k", "gae")),
    Mutant("torch-score-on-first-token", "the score lands on the first response token instead of the last (trl#3750)",
           (("ppo_torch/advantages.py", "last = torch.nn.functional.one_hot(last_token_index(mask), mask.shape[-1])",
             "last = torch.nn.functional.one_hot(torch.zeros_like(last_token_index(mask)), mask.shape[-1])"),),
           (MATH, "-k", "shape_rewards")),
    Mutant("both-critic-raw-head", "the critic initialised from a normalised reward model reads its raw head",
           (("ppo_torch/models/heads.py", "critic.reward_gain, critic.reward_bias = 1.0, reward_model.reward_bias",
             "critic.reward_gain, critic.reward_bias = 1.0, 0.0"),
            ("ppo_jax/models/heads.py", "critic.reward_gain, critic.reward_bias = 1.0, reward_model.reward_bias",
             "critic.reward_gain, critic.reward_bias = 1.0, 0.0")),
           (REFERENCE, "-k", "reward-model")),
    Mutant("shared-missing-eos-penalty-sign", "the host adds the missing-EOS penalty instead of subtracting it",
           (("ppo_rlhf/runtime/ppo.py", 'a["scores"] - cfg.missing_eos_penalty',
             'a["scores"] + cfg.missing_eos_penalty'),),
           (REFERENCE, "-k", "reward-fn")),
    Mutant("shared-kl-controller-sign", "the adaptive controller raises beta when the KL is below target",
           (("ppo_rlhf/kl_control.py", "error = float(np.clip(float(current_kl) / target - 1.0, -0.2, 0.2))",
             "error = float(np.clip(1.0 - float(current_kl) / target, -0.2, 0.2))"),),
           (MATH, "-k", "kl_controller")),
    Mutant("jax-adam-bias-correction-float32",
           "AdamW's bias correction 1 - b2^t from b2 rounded to float32 (optax's formula): every float32 step "
           "~1e-5 short",
           (("ppo_jax/optim.py", "return (-jnp.expm1(count.astype(wide) * math.log(decay))).astype(dtype)",
             "return (1 - decay ** count).astype(dtype)"),),
           (PPO_PARITY, "-k", "default")),
    Mutant("jax-whiten-unbiased", "advantages whitened with the unbiased variance where the biased one is asked",
           (("ppo_jax/masked.py", "denom = (n - 1) if unbiased else n", "denom = n - 1"),),
           (MATH, "-k", "whiten")),
    # critic-free estimators
    Mutant("both-group-statistics-wrong-axis",
           "each group's mean and std taken over samples strided across prompts, not the G adjacent ones",
           (("ppo_jax/advantages.py", "s = _float(scores).reshape(-1, num_generations)",
             "s = _float(scores).reshape(num_generations, -1).T"),
            ("ppo_torch/advantages.py", "s = _float(scores).reshape(-1, num_generations)",
             "s = _float(scores).reshape(num_generations, -1).T")),
           (REFERENCE, "-k", "grpo")),
    Mutant("both-rloo-baseline-includes-self", "RLOO's leave-one-out baseline averages the sample itself too",
           (("ppo_jax/advantages.py", "out = s - (jnp.sum(s, axis=-1, keepdims=True) - s) / (num_generations - 1)",
             "out = s - jnp.sum(s, axis=-1, keepdims=True) / num_generations"),
            ("ppo_torch/advantages.py", "out = s - (s.sum(dim=-1, keepdim=True) - s) / (num_generations - 1)",
             "out = s - s.sum(dim=-1, keepdim=True) / num_generations")),
           (MATH, "-k", "group_advantages")),
    Mutant("both-sum-norm-micro-batches-by-tokens",
           "Dr. GRPO's constant-divisor loss accumulated over micro-batches weighted by their tokens",
           (("ppo_jax/masked.py", "n = jnp.asarray(mask.shape[0])", "n = jnp.sum(mask)"),
            ("ppo_torch/masked.py", "n = torch.tensor(mask.shape[0], device=mask.device)", "n = mask.sum()")),
           (REFERENCE, "-k", "sum-norm")),
    Mutant("both-kl-loss-k2-as-k1", "the KL-in-the-loss k2 computed as k1, whose expected gradient is 0",
           (("ppo_jax/losses.py", "return kl_penalty(logprobs, ref_logprobs, kind, mask=mask)\n    value",
             "return kl_penalty(logprobs, ref_logprobs, 'k1' if kind == 'k2' else kind, mask=mask)\n    value"),
            ("ppo_torch/losses.py", "return kl_penalty(logprobs, ref_logprobs, kind, mask=mask)\n    value",
             "return kl_penalty(logprobs, ref_logprobs, 'k1' if kind == 'k2' else kind, mask=mask)\n    value")),
           (REFERENCE, "-k", "grpo")),
    Mutant("jax-norm-statistics-in-bf16",
           "bf16-compute norms take their mean, variance and rsqrt in bf16 (moves bf16 log-probs by only "
           "~0.01 nats: under the precision tests' bounds)",
           (("ppo_jax/models/layers.py", "self.eps = eps\n        self.scale = nnx.Param(jnp.ones((dim,), dt))",
             "self.eps, self.config = eps, config\n        self.scale = nnx.Param(jnp.ones((dim,), dt))"),
            ("ppo_jax/models/layers.py", "self.eps = eps\n        self.scale = nnx.Param(jnp.ones((dim,), jnp_dtype(",
             "self.eps, self.config = eps, config\n        self.scale = nnx.Param(jnp.ones((dim,), jnp_dtype("),
            ("ppo_jax/models/layers.py", "x32 = upcast(x)\n        mean = jnp.mean",
             "x32 = x.astype(compute_dtype(self.config))\n        mean = jnp.mean"),
            ("ppo_jax/models/layers.py", "x32 = upcast(x)\n        y = x32 * jax.lax.rsqrt",
             "x32 = x.astype(compute_dtype(self.config))\n        y = x32 * jax.lax.rsqrt")),
           ("tests/test_mixed_precision.py", "-k", "statistics")),
    # LoRA (the planted bugs of the LoRA issue)
    Mutant("jax-lora-scaling-wrong", "the adapter's term scaled by 2 alpha / rank instead of alpha / rank",
           (("ppo_jax/models/lora.py", "self.scaling = lr.scaling(rank, alpha)",
             "self.scaling = 2 * lr.scaling(rank, alpha)"),),
           (PPO_PARITY, "-k", "lora")),
    Mutant("both-lora-reference-adapters-on", "the reference is the LoRA policy with its adapters left on",
           (("ppo_jax/ppo.py", "with adapters_disabled(roles.policy):",
             "with __import__('contextlib').nullcontext():"),
            ("ppo_torch/ppo.py", "            return adapters_disabled(self.policy)",
             "            return contextlib.nullcontext(self.policy)")),
           (LORA, "-k", "ppo_trains")),
    Mutant("both-lora-base-trained", "the base weights of a LoRA policy trained with its adapters",
           (("ppo_jax/models/lora.py", "    if not _core(model).config.options.lora:\n        return nnx.Param",
             "    if True:\n        return nnx.Param"),
            ("ppo_torch/models/lora.py", 'p.requires_grad_(".lora_" in name or name == hfc.SCORE_NAME)',
             "p.requires_grad_(True)")),
           (LORA, "-k", "ppo_trains")),
    # ... and the same bugs in both backends, which the JAX-vs-torch parity cannot see: the
    # independent reference (its own adapted projections) and the RM / SFT step parity
    Mutant("both-lora-scaling-wrong", "the adapter's term scaled by 2 alpha / rank in both backends",
           (("ppo_jax/models/lora.py", "self.scaling = lr.scaling(rank, alpha)",
             "self.scaling = 2 * lr.scaling(rank, alpha)"),
            ("ppo_torch/models/lora.py",
             "    inject_adapter_in_model(LoraConfig(**cfg), hf_model, adapter_name=ADAPTER)\n",
             "    inject_adapter_in_model(LoraConfig(**cfg), hf_model, adapter_name=ADAPTER)\n"
             "    for m in lora_layers(hf_model):\n        m.scaling[ADAPTER] *= 2\n")),
           (REFERENCE, "-k", "lora")),
    Mutant("both-lora-adapters-never-off", "adapters_disabled leaves the adapters on, in both backends",
           (("ppo_jax/models/lora.py", "            m.adapters_enabled = False",
             "            m.adapters_enabled = True"),
            ("ppo_torch/models/lora.py", "            m.enable_adapters(False)",
             "            m.enable_adapters(True)")),
           (REFERENCE, "-k", "lora")),
    Mutant("both-lora-rm-base-trained", "a LoRA reward model's base weights trained, in both backends",
           (("ppo_jax/models/lora.py", "    if not _core(model).config.options.lora:\n        return nnx.Param",
             "    if True:\n        return nnx.Param"),
            ("ppo_torch/models/lora.py", 'p.requires_grad_(".lora_" in name or name == hfc.SCORE_NAME)',
             "p.requires_grad_(True)")),
           ("parity_tests/test_reward_model_parity.py", "-k", "lora_reward_model")),
    Mutant("jax-lora-dropout-unscaled", "adapter dropout keeps elements without the 1 / (1 - p) scale",
           (("ppo_jax/models/lora.py",
             "x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, dt), jnp.zeros((), dt))",
             "x = jnp.where(keep, x, jnp.zeros((), dt))"),),
           (LORA, "-k", "masks_and_scales")),
    Mutant("jax-lora-dropout-same-mask-every-layer", "every layer of the scanned stack draws the same dropout mask",
           (("ppo_jax/models/lora.py", "keys = jax.random.split(k, shape[0]) if len(shape) == 2 else k",
             "keys = jnp.stack([k] * shape[0]) if len(shape) == 2 else k"),),
           (LORA, "-k", "distinct_per_layer")),
    Mutant("torch-lora-dropout-unseeded", "torch's adapter dropout draws from the global generator: runs do not repeat",
           (("ppo_torch/models/lora.py", "        torch.manual_seed(seed)\n", ""),),
           (LORA, "-k", "test_ppo_with_lora_dropout and torch")),
    Mutant("both-lora-base-dtype-ignored", "lora_base_dtype accepted but the base kept in float32 (no memory saved)",
           (("ppo_jax/models/loading.py", "dt if base_dt is None or trained else base_dt)", "dt)"),
            ("ppo_torch/models/causal_lm.py",
             "if not p.requires_grad and p.is_floating_point() and p.dtype != dt:", "if False:")),
           ("parity_tests/test_precision_parity.py", "-k", "lora_base_dtype")),
]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "*.egg-info", "build")
    shutil.copytree(ROOT, dst, ignore=ignore)


def apply(mutant: Mutant, tree: Path) -> None:
    for rel, old, new in mutant.edits:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise LookupError(f"{rel}: the text to mutate occurs {text.count(old)} times, not once: {old!r}")
        path.write_text(text.replace(old, new))


def run(mutant: Mutant, *, verbose: bool) -> tuple[str, float]:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        tree = Path(tmp) / "tree"
        _copy_tree(tree)
        try:
            apply(mutant, tree)
        except LookupError as e:
            print(f"  {e}", file=sys.stderr)
            return "ERROR", time.monotonic() - t0
        # the fast tests as the default suite runs them: XLA:CPU code at LLVM -O0 (conftest.py),
        # also when this run is itself a test of the slow suite (which runs at XLA's default)
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "PPO_RLHF_TEST_XLA_OPT": "0"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=not verbose, text=True)
    # pytest: 0 all passed, 1 tests failed, 5 nothing collected (the -k selects nothing: an error)
    verdict = {0: "SURVIVED", 1: "KILLED"}.get(out.returncode, "ERROR")
    if verdict == "ERROR" and not verbose:
        print((out.stdout or "")[-2000:] + (out.stderr or "")[-2000:], file=sys.stderr)
    return verdict, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--verbose", action="store_true", help="show pytest's output")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:45s} {m.why}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutant(s): {', '.join(unknown)}")
    results = []
    for name in names:
        verdict, secs = run(by_name[name], verbose=args.verbose)
        results.append((name, verdict))
        print(f"{verdict:9s} {name} ({secs:.0f} s)", flush=True)
    bad = [n for n, v in results if v != "KILLED"]
    print(f"{len(results) - len(bad)} of {len(results)} mutants killed" +
          (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
