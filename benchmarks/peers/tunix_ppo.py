"""Tunix's PPO learner (google-tunix==0.1.7, JAX/Flax NNX) on the shared PPO workload, timed per phase.

Run with the peer's own environment (see setup_tunix.sh):

    benchmarks/peers/.venv-tunix/bin/python benchmarks/peers/tunix_ppo.py --model tiny1m \
        --iterations 3 --warmup 1 --out benchmarks/peers/results/tunix_tiny1m.json

Models. Tunix 0.1.7 ships no GPT-2 (its model zoo: Gemma 1-4, Llama 3, Qwen 2/3, DeepSeek V3, ...),
so the peer uses its smallest GPT-2-like architecture, `tunix.models.qwen2.Qwen2`, at the SAME
n_layer / n_embd / n_head / vocab as the GPT-2 spec, random weights, float32, with the LM head tied to
the embedding (as GPT-2's is). Differences from GPT-2 that remain: RMSNorm instead of LayerNorm,
RoPE instead of learned positions (no n_positions x n_embd table), biases on q/k/v only, and a
SwiGLU MLP (3 matrices) instead of a 4x GELU MLP (2 matrices). With `--ffn matched` (default) the
SwiGLU width is round8(8*n_embd/3) so the MLP has ~8*n_embd^2 weights like GPT-2's (exactly for
n_embd 768: 2048; tiny1m: 344); `--ffn 4x` uses 4*n_embd. Parameter counts of both are in the JSON.
Reference = a copy of the initial policy. Critic = `tunix.rl.utils.create_critic_model` of an
untied Qwen2 (its `lm_head` replaced by Linear(n_embd, 1)), other random weights. Reward = the
shared integer reward function (workload.reward_fn; default, `--reward fn`), or a second critic-
shaped model (`--reward model`; note Tunix 0.1.7 adds scores into an int32 tensor, which truncates
float scores, so that mode is for timing only).

The mesh is 1x1 ("fsdp", "tp") on the one CPU device, made with axis_types=(AxisType.Auto,)*2 so
that Tunix's sharding annotations resolve as plain GSPMD hints on a single CPU device. Tokenizer: a
stand-in over ids "t0".."t{V-1}" whose pad = eos = V, an id the model can never sample, so every
response is exactly response_len tokens, nothing is padded or masked, and the sampler never stops
early.

Timing. `learner.train()` runs W + N global steps (= PPO iterations). An iteration is one
`_run_global_step` call (rollout + advantages + epochs x minibatches of actor and critic updates),
ended by blocking on the actor's and critic's parameters. Phases wrap, in memory only, the
RLCluster / learner methods the PPO learner calls, each blocking (`jax.block_until_ready`) on its
result so the time is the phase's own compute:
  generation      rl_cluster.generate (Tunix sampler: prefill + while_loop decode with KV cache)
  ref_forward     rl_cluster.get_ref_per_token_logps
  policy_forward  rl_cluster.get_old_per_token_logps (Tunix re-scores the samples with the policy)
  value_forward   rl_cluster.get_values
  reward_fn / reward_forward   learner._compute_rewards (decode + python fn) / rl_cluster.get_rewards
  advantages      the registered "gae" advantage estimator (jitted reverse lax.scan + whitening)
  update_policy   rl_cluster.update_actor (epochs x minibatches, one jitted train step each)
  update_value    rl_cluster.update_critic (likewise, separate model and optimizer)
  other           the rest of the iteration (KL/reward shaping, Tunix's metric buffering with
                  host transfers, data queue hand-off between its rollout thread and trainer)
With `--no-phase-sync` the wrappers are not installed, so Tunix's asynchronous dispatch is left as
is; only whole iterations are timed then.
Every wall time has a process-CPU-time twin (`*_cpu_s`: all threads, less disturbed by other
processes on this shared machine). JIT compilations are counted per iteration through jax.monitoring
(backend compile events).

Output JSON (also printed, abridged): the schema of workload.build_result —
  {"program": "tunix", "model": name, "config": {...}, "iteration_s": median, "iteration_s_all": [...],
   "first_iteration_s": .., "warmup_iterations_s": [...], "tokens_per_s": .., "phases":
   {"generation": {"median_s": .., "all_s": [..]}, ...}, "peak_rss_mb": .., "versions": {...},
   "machine": {...}, "notes": [...], "compiles_per_iteration": [...], "setup_s": ..}
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload as W

_THREADS = W.threads_from_argv()
if _THREADS is not None:  # must be in XLA_FLAGS before jax is imported
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if _THREADS > 1 else 'false'}"
        + f" intra_op_parallelism_threads={_THREADS}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from tunix.models.qwen2 import model as qwen2_lib  # noqa: E402
from tunix.rl import function_registry  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl import utils as rl_utils  # noqa: E402
from tunix.rl.ppo import ppo_learner as ppo_lib  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402


class StandInTokenizer:
    """The five methods Tunix's TokenizerAdapter needs. Text is "t12 t7 ..."; pad = eos = vocab_size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    def bos_id(self):
        return None  # falsy: the sampler prepends no BOS

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return self.vocab_size


def reward_from_text(prompts, completions, **kwargs):
    """workload.reward_fn on each decoded completion; integers (Tunix 0.1.7's reward tensor is int32)."""
    return [W.reward_fn(int(w[1:]) for w in c.split()) for c in completions]


def ffn_width(n_embd: int, mode: str) -> int:
    if mode == "4x":
        return 4 * n_embd
    return int(round(8 * n_embd / 3 / 8)) * 8


def n_params(model) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_cli_args(p)
    p.add_argument("--reward", choices=["fn", "model"], default="fn")
    p.add_argument("--ffn", choices=["matched", "4x"], default="matched", help="SwiGLU width (see docstring)")
    p.add_argument("--no-phase-sync", action="store_true", help="time whole iterations only")
    args = p.parse_args(argv)
    spec, wl = W.spec_from_args(args), W.workload_from_args(args)
    if args.wait_quiet:
        W.wait_quiet(args.wait_quiet)
    n_iter = args.warmup + args.iterations
    t_setup = time.perf_counter()

    # ---- compile counting ----
    compiles = {"n": 0, "s": 0.0}

    def _on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["n"] += 1
            compiles["s"] += duration

    jax.monitoring.register_event_duration_secs_listener(_on_duration)

    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    head_dim = spec.n_embd // spec.n_head
    common = dict(
        num_layers=spec.n_layer,
        vocab_size=spec.vocab_size,
        embed_dim=spec.n_embd,
        hidden_dim=ffn_width(spec.n_embd, args.ffn),
        num_heads=spec.n_head,
        head_dim=head_dim,
        num_kv_heads=spec.n_head,  # plain multi-head attention, as GPT-2
        rope_theta=10_000,
        norm_eps=1e-5,
    )
    policy_cfg = qwen2_lib.ModelConfig(**common, use_tied_embedding=True)
    critic_cfg = qwen2_lib.ModelConfig(**common, use_tied_embedding=False)
    with jax.set_mesh(mesh):
        policy = qwen2_lib.Qwen2(policy_cfg, rngs=nnx.Rngs(wl.seed))
        graph, state = nnx.split(policy)
        reference = nnx.merge(graph, jax.tree.map(jnp.copy, state))
        critic = rl_utils.create_critic_model(
            qwen2_lib.Qwen2(critic_cfg, rngs=nnx.Rngs(wl.seed + 1)), seed=wl.seed + 1
        )
        reward_model = None
        if args.reward == "model":
            reward_model = rl_utils.create_critic_model(
                qwen2_lib.Qwen2(critic_cfg, rngs=nnx.Rngs(wl.seed + 2)), seed=wl.seed + 2
            )
    params = {"policy": n_params(policy), "reference": n_params(reference), "value": n_params(critic)}
    if reward_model is not None:
        params["reward"] = n_params(reward_model)

    adam = lambda: optax.adamw(wl.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)  # = TRL's AdamW
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=wl.response_len,
        max_prompt_length=wl.prompt_len,
        kv_cache_size=wl.prompt_len + wl.response_len,
        temperature=wl.temperature,
        top_p=1.0,  # top_p=None would select greedy decoding; 1.0 + no top_k samples the full softmax
        top_k=None,
        eos_tokens=[spec.vocab_size],
    )
    roles = [
        rl_cluster_lib.Role.ACTOR,
        rl_cluster_lib.Role.CRITIC,
        rl_cluster_lib.Role.REFERENCE,
        rl_cluster_lib.Role.ROLLOUT,
        rl_cluster_lib.Role.REWARD,
    ]
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in roles},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=adam(),
            critic_optimizer=adam(),
            eval_every_n_steps=10**9,
            max_steps=n_iter * wl.ppo_epochs * wl.minibatches,
            mini_batch_size=wl.batch // wl.minibatches,
            train_micro_batch_size=wl.batch // wl.minibatches,
        ),
        rollout_config=rollout_config,
    )
    tok = StandInTokenizer(spec.vocab_size)
    cluster = rl_cluster_lib.RLCluster(
        actor=policy,
        critic=critic,
        reference=reference,
        reward=reward_model,
        tokenizer=tok,
        cluster_config=cluster_config,
    )
    ppo_config = ppo_lib.PPOConfig(
        num_iterations=wl.ppo_epochs,
        gamma=wl.gamma,
        gae_lambda=wl.lam,
        beta=wl.kl_coef,
        kl_method="kl",  # k1, as TRL's default
        epsilon=wl.cliprange,
        clip_range_value=wl.cliprange_value,
        entropy_coef=None,
    )
    learner = ppo_lib.PPOLearner(
        rl_cluster=cluster,
        ppo_config=ppo_config,
        reward_fns=[reward_from_text] if args.reward == "fn" else None,
    )

    # ---- instrumentation (in-memory wrappers; nothing on disk is modified) ----
    timer = W.PhaseTimer()
    block = jax.block_until_ready

    def wrap(obj, attr, name, sync):
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            with W.Stopwatch() as sw:
                out = orig(*a, **k)
                sync(out)
            timer.add(name, sw.wall, sw.cpu)
            return out

        setattr(obj, attr, wrapped)

    def block_out(out):
        block(out)

    def block_actor(_):
        block(nnx.state(cluster.actor_trainer.model))

    def block_critic(_):
        block(nnx.state(cluster.critic_trainer.model))

    if not args.no_phase_sync:
        wrap(cluster, "generate", "generation", lambda out: None)  # returns host (numpy) tokens
        wrap(cluster, "get_ref_per_token_logps", "ref_forward", block_out)
        wrap(cluster, "get_old_per_token_logps", "policy_forward", block_out)
        wrap(cluster, "get_values", "value_forward", block_out)
        wrap(cluster, "get_rewards", "reward_forward", block_out)
        wrap(learner, "_compute_rewards", "reward_fn", block_out)
        wrap(cluster, "update_actor", "update_policy", block_actor)
        wrap(cluster, "update_critic", "update_value", block_critic)
        registry = function_registry.default_registry._registry  # pylint: disable=protected-access
        orig_gae = registry["advantage_estimator"]["gae"]

        def timed_gae(*a, **k):
            with W.Stopwatch() as sw:
                out = block(orig_gae(*a, **k))
            timer.add("advantages", sw.wall, sw.cpu)
            return out

        registry["advantage_estimator"]["gae"] = timed_gae

    iteration_times: list[float] = []
    iteration_cpu_times: list[float] = []
    compiles_per_iteration: list[int] = []
    compile_s_per_iteration: list[float] = []
    orig_global_step = learner._run_global_step  # pylint: disable=protected-access

    def timed_global_step(*a, **k):
        c0, s0 = compiles["n"], compiles["s"]
        with W.Stopwatch() as sw:
            out = orig_global_step(*a, **k)
            block(nnx.state(cluster.actor_trainer.model))
            block(nnx.state(cluster.critic_trainer.model))
        iteration_times.append(sw.wall)
        iteration_cpu_times.append(sw.cpu)
        compiles_per_iteration.append(compiles["n"] - c0)
        compile_s_per_iteration.append(round(compiles["s"] - s0, 4))
        timer.end_iteration()
        return out

    learner._run_global_step = timed_global_step  # pylint: disable=protected-access

    prompts = W.prompt_ids(spec, wl, n_iter)
    # A numpy array of strings, as a grain batch would give (a plain list gets split per leaf).
    train_ds = [{"prompts": np.array([tok.decode(row) for row in batch])} for batch in prompts]
    setup_s = time.perf_counter() - t_setup
    learner.train(train_ds)

    if len(iteration_times) != n_iter:
        raise RuntimeError(f"expected {n_iter} PPO iterations, timed {len(iteration_times)}")
    warm, timed_its = iteration_times[: args.warmup], iteration_times[args.warmup :]
    from importlib.metadata import version

    import flax

    notes = [
        "Architecture: Tunix 0.1.7 has no GPT-2; Qwen2 (RMSNorm, RoPE, q/k/v biases, SwiGLU) at the "
        f"GPT-2 spec's layers/hidden/heads/vocab, tied LM head, SwiGLU width {common['hidden_dim']} "
        f"({args.ffn}); random weights, float32.",
        "Rollout forwards: reference log-probs, a separate policy re-scoring forward (old log-probs; "
        "Tunix does not reuse the sampler's logits), critic values"
        + (", reward-model scores." if args.reward == "model" else "; the reward is a Python function on "
           "decoded text (no reward-model forward)."),
        "Update: for each epoch (num_iterations) Tunix runs one actor train step (policy forward + "
        "backward + AdamW) and then one critic train step (value forward + backward + AdamW): two "
        "separate jitted programs and optimizers, where TRL does one joint backward over both.",
        "Generation: Tunix sampler, jitted prefill + lax.while_loop decode, KV cache of "
        "prompt_len+response_len, sampling from softmax(logits/T) (top_p=1.0 short-circuits to "
        "jax.random.categorical). The sampler's PRNG key is PRNGKey(0) on every call when "
        "RolloutConfig.seed is None (as here): each iteration reuses the same sampling noise.",
        "Tunix's rollout runs in a worker thread that hands TrainExamples to the trainer through a "
        "queue; with actor and rollout on the same mesh it is not overlapped with training.",
        "KL: k1 (kl_method='kl') with beta = kl_coef; GAE gamma/lambda as the workload; advantages "
        "whitened; value loss clipped, 0.5 * token-mean.",
        "No padding: prompts are all prompt_len tokens, pad/eos id = vocab_size is never sampled.",
        f"JAX devices: {jax.devices()}; mesh {dict(mesh.shape)} with AxisType.Auto axes; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}.",
    ]
    if args.no_phase_sync:
        notes.append("--no-phase-sync: phases not instrumented; only whole iterations timed.")
    if args.reward == "model":
        notes.append("reward model mode: Tunix 0.1.7 adds the float scores into an int32 reward tensor "
                     "(truncation); valid for timing only.")
    result = W.build_result(
        program="tunix",
        spec=spec,
        wl=wl,
        config_extra={
            "reward": args.reward,
            "architecture": "tunix.models.qwen2.Qwen2 (tied head) + create_critic_model critic",
            "ffn": args.ffn,
            "ffn_width": common["hidden_dim"],
            "params": params,
            "tunix_ppo_config": {
                "beta": ppo_config.beta,
                "kl_method": ppo_config.kl_method,
                "epsilon": ppo_config.epsilon,
                "clip_range_value": ppo_config.clip_range_value,
                "gamma": ppo_config.gamma,
                "gae_lambda": ppo_config.gae_lambda,
                "num_iterations": ppo_config.num_iterations,
                "optimizer": "optax.adamw(lr, 0.9, 0.999, 1e-8, weight_decay=0) for actor and critic",
            },
            "phase_sync": not args.no_phase_sync,
        },
        iteration_times=timed_its,
        warmup_times=warm,
        timer=timer,
        n_warmup=args.warmup,
        iteration_cpu_times=iteration_cpu_times,
        versions={
            "google-tunix": version("google-tunix"),
            "jax": jax.__version__,
            "jaxlib": version("jaxlib"),
            "flax": flax.__version__,
            "optax": optax.__version__,
            "python": sys.version.split()[0],
        },
        notes=notes,
        extra={
            "setup_s": setup_s,
            "compiles_per_iteration": compiles_per_iteration,
            "compile_s_per_iteration": compile_s_per_iteration,
        },
    )
    W.emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
