"""TRL's PPOTrainer (trl==1.12.0, trl.experimental.ppo) on the shared PPO workload, timed per phase.

Run with the peer's own environment (see setup_trl.sh):

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_ppo.py --model tiny1m \
        --iterations 3 --warmup 1 --out benchmarks/peers/results/trl_tiny1m.json

Models (random weights, float32, CPU): policy = GPT2LMHeadModel; reference = TRL's own deep copy of
the policy (ref_model=None); value = GPT2ForSequenceClassification(num_labels=1); reward =
GPT2ForSequenceClassification(num_labels=1) with other random weights (`--reward model`, default) or
the shared integer reward function of workload.py wrapped as a parameter-free "reward model"
(`--reward fn`). The tokenizer is a stand-in whose pad/EOS id is `vocab_size`, an id the model can
never sample, so every response is exactly `response_len` tokens and nothing is masked as padding.

Timing. The whole `trainer.train()` runs W + N iterations; an iteration is the time between two
`on_step_end` callbacks (the first from `on_train_begin`), so it includes TRL's own per-iteration
logging, `gc.collect()` and data loading. Phases are measured by wrapping, in memory only, the
module-level functions TRL's loop calls (nothing on disk is modified):
  generation      `batch_generation` (HF `generate` with output_scores; the policy's rollout
                  log-probs are taken from these sampling logits: TRL runs no separate policy forward)
  ref_forward     `forward(ref_policy, ...)` under no_grad
  value_forward   `get_reward(value_model, ...)` (rollout values)
  reward_forward  `get_reward(reward_model, ...)` (scores)
  advantages      from the end of the last rollout forward to the first training forward, less
                  the gc.collect() in between: masks, k1 KL penalty, reward shaping, the GAE loop
                  (a Python loop over response positions), advantage whitening
  gc_collect      TRL's two gc.collect() calls per iteration
  update          from the first training forward to the end of the last `optimizer.step()`:
                  epochs x minibatches of (policy + value forward, joint backward, AdamW step)
  other           iteration time outside all of the above (printed as `other`)
torch on CPU is synchronous, so wall-clock around a call is the call's compute time. Every wall
time has a process-CPU-time twin (`*_cpu_s`: all threads; less disturbed by other processes).

Output JSON (also printed, abridged):
  {"program": "trl", "model": name, "config": {model sizes, gpt2_params, workload, params,...},
   "iteration_s": median seconds per timed iteration, "iteration_s_all": [...],
   "first_iteration_s": the first (warm-up) iteration, "warmup_iterations_s": [...],
   "tokens_per_s": batch*(prompt_len+response_len)/iteration_s, "tokens_per_s_definition": str,
   "phases": {"generation": {"median_s": .., "all_s": [..]}, "ref_forward": .., "value_forward": ..,
              "reward_forward": .., "advantages": .., "update": .., "gc_collect": ..,
              "other": {"median_s": ..}},
   "peak_rss_mb": ru_maxrss of this process, "versions": {...}, "machine": {...},
   "notes": [str, ...], "timestamp_utc": str}
"""

from __future__ import annotations

import argparse
import gc as _gc
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import transformers
import trl
import workload as W
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo_mod


class StandInTokenizer:
    """What PPOTrainer reads from its processing_class: pad/eos ids (and decode, for sample logs).

    pad = eos = vocab_size: outside the model's vocabulary, so never sampled; TRL masks it to id 0
    before any forward pass, so it never reaches an embedding table either."""

    def __init__(self, vocab_size: int):
        self.pad_token_id = vocab_size
        self.eos_token_id = vocab_size
        self.padding_side = "left"

    def batch_decode(self, ids, **kwargs):
        return [" ".join(f"t{int(t)}" for t in row) for row in ids]


class _FnBackbone(torch.nn.Module):
    """Hidden state whose channel 0 at position t is reward_fn of the response tokens up to t."""

    def __init__(self, prompt_len: int):
        super().__init__()
        self.prompt_len = prompt_len

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        resp = input_ids[:, self.prompt_len :]
        even = (resp % 2 == 0).to(torch.float32).cumsum(1)
        n = torch.arange(1, resp.shape[1] + 1, dtype=torch.float32)
        score = even - torch.div(n, 2, rounding_mode="floor")
        full = torch.zeros(input_ids.shape, dtype=torch.float32)
        full[:, self.prompt_len :] = score
        return SimpleNamespace(hidden_states=[full[..., None]])


class FnRewardModel(torch.nn.Module):
    """workload.reward_fn in the shape TRL's get_reward expects (backbone + score head)."""

    base_model_prefix = "backbone"

    def __init__(self, prompt_len: int):
        super().__init__()
        self.backbone = _FnBackbone(prompt_len)
        self.score = torch.nn.Identity()


class IterationClock(TrainerCallback):
    def __init__(self, timer: W.PhaseTimer, on_iteration_end):
        self.timer = timer
        self.on_iteration_end = on_iteration_end
        self.last = self.last_cpu = None
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now, now_cpu = time.perf_counter(), time.process_time()
        self.on_iteration_end()
        self.times.append(now - self.last)
        self.cpu_times.append(now_cpu - self.last_cpu)
        self.last, self.last_cpu = now, now_cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_cli_args(p)
    p.add_argument("--reward", choices=["model", "fn"], default="model")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention kernel")
    args = p.parse_args(argv)
    spec, wl = W.spec_from_args(args), W.workload_from_args(args)
    if args.wait_quiet:
        W.wait_quiet(args.wait_quiet)
    n_iter = args.warmup + args.iterations
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(wl.seed)

    cfg = GPT2Config(
        vocab_size=spec.vocab_size,
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,  # TRL passes its own pad id (the stand-in tokenizer's) to every helper
        num_labels=1,
    )
    cfg._attn_implementation = args.attn
    policy = GPT2LMHeadModel(cfg)
    policy.generation_config.eos_token_id = None
    policy.generation_config.pad_token_id = None
    value = GPT2ForSequenceClassification(cfg)
    reward = GPT2ForSequenceClassification(cfg) if args.reward == "model" else FnRewardModel(wl.prompt_len)
    n_params = lambda m: sum(t.numel() for t in m.parameters())

    prompts = W.prompt_ids(spec, wl, n_iter).reshape(n_iter * wl.batch, wl.prompt_len)
    train_ds = Dataset.from_dict({"input_ids": prompts.tolist()})
    eval_ds = Dataset.from_dict({"input_ids": prompts[: wl.batch].tolist()})
    collate = lambda feats: {"input_ids": torch.tensor([f["input_ids"] for f in feats], dtype=torch.long)}

    tmp = tempfile.mkdtemp(prefix="trl_ppo_")
    config = PPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=wl.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=wl.minibatches,
        num_ppo_epochs=wl.ppo_epochs,
        total_episodes=n_iter * wl.batch,
        local_rollout_forward_batch_size=wl.batch,
        response_length=wl.response_len,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        temperature=wl.temperature,
        learning_rate=wl.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        kl_coef=wl.kl_coef,
        kl_estimator="k1",
        cliprange=wl.cliprange,
        cliprange_value=wl.cliprange_value,
        vf_coef=0.1,
        gamma=wl.gamma,
        lam=wl.lam,
        whiten_rewards=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=wl.seed,
        dataloader_num_workers=0,
    )
    tok = StandInTokenizer(spec.vocab_size)
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=train_ds,
        value_model=value,
        data_collator=collate,
        eval_dataset=eval_ds,
    )

    # ---- phase instrumentation (in-memory wrappers around TRL's module-level helpers) ----
    timer = W.PhaseTimer()
    state = {"rollout_end": None, "update_start": None, "update_end": None, "gc_in_window": (0.0, 0.0)}
    fresh = dict(state)  # wall (perf_counter) and CPU (process_time) pairs below
    orig_batch_generation = trl_ppo_mod.batch_generation
    orig_forward = trl_ppo_mod.forward
    orig_get_reward = trl_ppo_mod.get_reward
    value_model = trainer.value_model
    reward_model = trainer.reward_model

    def now():
        return time.perf_counter(), time.process_time()

    def timed(name, fn, *a, **k):
        with W.Stopwatch() as sw:
            out = fn(*a, **k)
        timer.add(name, sw.wall, sw.cpu)
        return out

    def batch_generation(*a, **k):
        return timed("generation", orig_batch_generation, *a, **k)

    def forward(model, *a, **k):
        if torch.is_grad_enabled():  # training forward (PolicyAndValueWrapper)
            if state["update_start"] is None:
                t = now()
                state["update_start"] = t
                if state["rollout_end"] is not None:
                    (w0, c0), (gw, gc_) = state["rollout_end"], state["gc_in_window"]
                    timer.add("advantages", t[0] - w0 - gw, t[1] - c0 - gc_)
            return orig_forward(model, *a, **k)
        return timed("ref_forward", orig_forward, model, *a, **k)

    def get_reward(model, *a, **k):
        if model is reward_model:
            out = timed("reward_forward", orig_get_reward, model, *a, **k)
            state["rollout_end"] = now()
            return out
        name = "value_forward" if model is value_model else "get_reward_other"
        return timed(name, orig_get_reward, model, *a, **k)

    trl_ppo_mod.batch_generation = batch_generation
    trl_ppo_mod.forward = forward
    trl_ppo_mod.get_reward = get_reward

    # TRL calls gc.collect() twice per iteration (once between the rollout and the advantages); time it
    # as its own phase so it does not inflate `advantages`.
    class _TimedGC:
        def __getattr__(self, name):
            return getattr(_gc, name)

        def collect(self, *a, **k):
            with W.Stopwatch() as sw:
                out = _gc.collect(*a, **k)
            timer.add("gc_collect", sw.wall, sw.cpu)
            if state["rollout_end"] is not None and state["update_start"] is None:
                gw, gc_ = state["gc_in_window"]
                state["gc_in_window"] = (gw + sw.wall, gc_ + sw.cpu)
            return out

    trl_ppo_mod.gc = _TimedGC()

    opt = trainer.optimizer
    orig_step = opt.step

    def step(*a, **k):
        out = orig_step(*a, **k)
        state["update_end"] = now()
        return out

    opt.step = step

    def on_iteration_end():
        if state["update_start"] is not None and state["update_end"] is not None:
            (w0, c0), (w1, c1) = state["update_start"], state["update_end"]
            timer.add("update", w1 - w0, c1 - c0)
        state.update(fresh)
        timer.end_iteration()

    clock = IterationClock(timer, on_iteration_end)
    trainer.add_callback(clock)

    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    times = clock.times
    warm, timed_its = times[: args.warmup], times[args.warmup :]
    notes = [
        "Policy rollout log-probs come from the generate() scores (the sampling logits); TRL runs no "
        "separate policy forward in the rollout, unlike a textbook iteration that re-scores the samples.",
        "HF generate() with a KV cache (DynamicCache), output_scores=True: it keeps all response_len x "
        "batch x vocab logits; sampling via temperature warper (T+1e-7), top_k=0, top_p=1.0.",
        "The value model runs its own forward over query+response in the rollout; in the update each "
        "minibatch runs the policy and the (separate) value backbone forward, one joint backward "
        "(loss = pg_loss + vf_coef*vf_loss) and one AdamW step over both models.",
        "Reference model = TRL's deep copy of the initial policy; it runs one no-grad forward.",
        "No padding: prompts are all prompt_len tokens; pad/eos id = vocab_size is never sampled, so "
        "responses are all response_len tokens (TRL still builds its masks).",
        "float32 (bf16=False, TRL's default is bf16=True), gradient_checkpointing=False (TRL's default is "
        "True), lr scheduler constant, dropout disabled by TRL.",
        f"torch threads: {torch.get_num_threads()}; attention kernel: {args.attn}.",
    ]
    if args.reward == "fn":
        notes.append("reward = workload.reward_fn wrapped as a parameter-free module (no reward-model forward).")
    else:
        notes.append("reward = GPT2ForSequenceClassification with random weights (score at the last token).")
    result = W.build_result(
        program="trl",
        spec=spec,
        wl=wl,
        config_extra={
            "reward": args.reward,
            "params": {
                "policy": n_params(policy),
                "value": n_params(value),
                "reward": n_params(reward),
            },
            "trl_ppo_config": {
                "kl_coef": config.kl_coef,
                "kl_estimator": config.kl_estimator,
                "vf_coef": config.vf_coef,
                "cliprange": config.cliprange,
                "cliprange_value": config.cliprange_value,
                "gamma": config.gamma,
                "lam": config.lam,
                "whiten_rewards": config.whiten_rewards,
                "optimizer": str(config.optim),
                "attn_implementation": args.attn,
            },
        },
        iteration_times=timed_its,
        warmup_times=warm,
        timer=timer,
        n_warmup=args.warmup,
        iteration_cpu_times=clock.cpu_times,
        versions={
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        notes=notes,
        extra={"torch_num_threads": torch.get_num_threads()},
    )
    W.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
