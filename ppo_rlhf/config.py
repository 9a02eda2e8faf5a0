"""The configs: every hyperparameter of PPO (`PPOConfig`), reward-model training (`RMConfig`) and
pretraining / SFT (`SFTConfig`), each a frozen dataclass shared by both backends.

Each field is documented with its default and the reason for it. Where published implementations
disagree (TRL, OpenRLHF, verl, ...) the choice is a field here, so that both backends and the parity tests can
exercise every variant. An invalid value is a ValueError naming the field and what is allowed
(`Config._check_range`, `_check_choice`, `_check_bool`: one set of checks for all three).

The formulas (docs/formulas.md):
  policy gradient   (4.1)  grad J = E[ sum_t grad log pi(a_t|s_t) * A_t ]
  importance ratio  (4.2)  r_t = pi(a_t|s_t) / pi_old(a_t|s_t)
  clipped objective (4.3)  L_CLIP = E_t[ min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t) ]
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ppo_rlhf.lora import DEFAULT_LORA_TARGETS, check_lora_options, lora_targets

PolicyLossKind = Literal["pg", "is", "clip"]
KLEstimator = Literal["k1", "k2", "k3"]
KLUnits = Literal["seq-sum", "token-mean"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AdvantageEstimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
ImportanceLevel = Literal["token", "sequence"]

POLICY_LOSS_KINDS = ("pg", "is", "clip")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_UNITS = ("seq-sum", "token-mean")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")
ADVANTAGE_ESTIMATORS = ("gae",) + GROUP_ADVANTAGE_KINDS + ("reinforce_pp", "reinforce_pp_baseline")
"""`PPOConfig.advantage_estimator`: GAE with a critic (PPO), or a critic-free one."""
"""`group_advantages` kinds: group-normalised (GRPO), group-centred (Dr. GRPO), leave-one-out (RLOO)."""
IMPORTANCE_LEVELS = ("token", "sequence")
"""`policy_loss(importance_level=...)`: one ratio per token (PPO), or one per sequence (GSPO)."""
KL_LOSS_KINDS = ("k1", "k2", "k3", "k1+", "k3+")
"""`kl_loss` estimators; "k1+" / "k3+" take k1's / k3's value and k2's gradient (straight-through)."""


RM_LOSSES = ("bradley_terry", "plackett_luce", "best_of_k", "rating")
TIES = ("drop", "keep")
LR_SCHEDULES = ("constant", "linear", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Allowed `compute_dtype`s (mixed precision; None = the weights' dtype)."""
FROZEN_DTYPES = ("float32", "bfloat16")
"""Allowed `PPOConfig.frozen_dtype`s (None = the trainer's dtype)."""
REMATS = ("none", "full", "dots")
"""Activation-checkpointing policies (the `remat` field of every config): the names of
`ppo_jax.models.stack.REMAT_POLICIES` and `ppo_torch.models.remat.REMAT_POLICIES`."""
Remat = Literal["none", "full", "dots"]
RMLoss = Literal["bradley_terry", "plackett_luce", "best_of_k", "rating"]


def check_model_options(owner: str, remat: Any, scan_unroll: Any, compute_dtype: Any) -> None:
    """The one check of the model options (`ModelOptions`, and the same fields of the three
    configs): a ValueError naming `owner`.field and what is allowed."""
    def fail(name: str, value: Any, allowed: str) -> None:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: allowed {allowed}")

    if remat not in REMATS:
        fail("remat", remat, "one of " + ", ".join(repr(c) for c in REMATS))
    if not isinstance(scan_unroll, bool):
        fail("scan_unroll", scan_unroll, "True or False")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        fail("compute_dtype", compute_dtype, "one of " + ", ".join(repr(c) for c in COMPUTE_DTYPES))


def check_lora_base_dtype(owner: str, lora_base_dtype: Any, compute_dtype: Any, lora_rank: Any) -> None:
    """`lora_base_dtype` (ModelOptions and the three configs): None, "float32" or "bfloat16";
    "bfloat16" needs LoRA (lora_rank > 0: the base is frozen) and compute_dtype="bfloat16" (the
    matmuls read the stored base weights in the compute dtype: a torch Linear holding bfloat16
    weights cannot take float32 inputs outside autocast). A one-line ValueError naming `owner`."""
    if lora_base_dtype is None:
        return
    if lora_base_dtype not in FROZEN_DTYPES:
        raise ValueError(f"{owner}.lora_base_dtype={lora_base_dtype!r} is invalid: allowed None or one of "
                         + ", ".join(repr(c) for c in FROZEN_DTYPES))
    if lora_base_dtype != "float32" and not (isinstance(lora_rank, int) and lora_rank > 0):
        raise ValueError(f"{owner}.lora_base_dtype={lora_base_dtype!r} needs LoRA (lora_rank > 0): without "
                         f"adapters every weight is trained")
    if lora_base_dtype != "float32" and compute_dtype != lora_base_dtype:
        raise ValueError(f"{owner}.lora_base_dtype={lora_base_dtype!r} needs compute_dtype={lora_base_dtype!r} "
                         f"(got {compute_dtype!r}): the base weights are stored in the compute dtype")


@dataclass(frozen=True)
class ModelOptions:
    """How a model runs, fixed when it is built: `load_pretrained(path, options=...)`, the
    loaders and constructors of both cores take it, and nothing changes it afterwards (a
    trainer builds every model it loads with its config's options, `Config.model_options()`).
    Each field is the config field of the same name (`PPOConfig.remat`, ...):

    remat         "none" | "full" | "dots": activation checkpointing of the transformer layers
                  in a backward (JAX: the layer scan's `jax.checkpoint` policy; torch:
                  `torch.utils.checkpoint` around each decoder layer)
    scan_unroll   JAX: the layer scan lowered unrolled (a compile-time choice); torch runs its
                  layers as a Python loop and has nothing to unroll
    compute_dtype None | "float32" | "bfloat16" | "float16": the matmuls' dtype (mixed
                  precision) while the weights keep theirs
    lora_rank     0 (no adapters) or the rank of the LoRA adapters the model is built with
                  (`ppo_rlhf.lora`; JAX: `ppo_jax.models.lora`, torch: `peft`): the base
                  weights are frozen, only the adapters are trained
    lora_alpha    the adapters' scale is lora_alpha / lora_rank (peft's `lora_alpha`)
    lora_dropout  dropout on the adapters' input (peft's), only in the forwards that are
                  differentiated: PPO's update, the RM and SFT steps -- never in generation,
                  the rollout's log-probs and values, the reference, evaluation or scoring
    lora_targets  the projections that get adapters, among `ppo_rlhf.lora.LORA_TARGETS`
                  (q, k, v, o, gate, up, down; `LORA_MODULES` maps them to each architecture)
    lora_base_dtype  None (the weights' dtype) or "bfloat16": a LoRA model's frozen base
                  weights (every parameter but the adapters and a trained score / value head)
                  stored in that dtype -- half their memory -- while the adapters and heads keep
                  the model's dtype (float32); needs compute_dtype equal to it. The forward is
                  the mixed-precision one: the residual stream, norms, softmaxes and log-probs
                  stay float32 (the stored embeddings and norm scales are read as float32)
    """

    remat: Remat = "none"
    scan_unroll: bool = False
    compute_dtype: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_base_dtype: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", lora_targets(self.lora_targets))
        check_model_options("ModelOptions", self.remat, self.scan_unroll, self.compute_dtype)
        check_lora_options("ModelOptions", self.lora_rank, self.lora_alpha, self.lora_dropout,
                           self.lora_targets)
        check_lora_base_dtype("ModelOptions", self.lora_base_dtype, self.compute_dtype, self.lora_rank)

    @property
    def base_dtype(self) -> str | None:
        """The dtype a LoRA model stores its frozen base weights in, None = the model's own."""
        return self.lora_base_dtype if self.lora and self.lora_base_dtype != "float32" else None

    @property
    def lora(self) -> bool:
        """Is the model built with LoRA adapters (lora_rank > 0)?"""
        return self.lora_rank > 0

    def frozen(self) -> "ModelOptions":
        """The options of a model that is never differentiated (PPO's reference and reward
        model): no remat -- there is no backward to save memory for."""
        return dataclasses.replace(self, remat="none")


class Config:
    """What the three configs share: (de)serialisation and the field checks."""

    LORA_ROLES: tuple[str, ...] = ()
    """The roles whose models this config's trainer builds and trains (what `lora_roles` may name)."""

    def model_options(self, role: str | None = None) -> ModelOptions:
        """The options this config's trainer builds its models with; the LoRA fields for a
        `role` among `lora_roles` (with lora_rank > 0), none for any other model.

        role=None: the options of every model of a trainer that does not build adapters yet --
        with lora_rank > 0 that is a NotImplementedError (rather than silently training the
        full models): the trainers do not train adapters yet."""
        options = ModelOptions(remat=self.remat, scan_unroll=self.scan_unroll,
                               compute_dtype=self.compute_dtype)
        if self.lora_rank and role is None:
            raise NotImplementedError(f"{type(self).__name__}.lora_rank={self.lora_rank}: the trainers "
                                      f"do not train LoRA adapters yet (build models with "
                                      f"model_options(role) and ppo_jax / ppo_torch .models)")
        if not self.lora_rank or role not in self.lora_roles:
            return options
        return dataclasses.replace(options, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                                   lora_dropout=self.lora_dropout, lora_targets=self.lora_targets,
                                   lora_base_dtype=self.lora_base_dtype)

    def _fail(self, name: str, value: Any, allowed: str) -> None:
        raise ValueError(f"{type(self).__name__}.{name}={value!r} is invalid: allowed {allowed}")

    def _check_range(self, name: str, lo: float | None, hi: float | None, *, lo_open: bool = False,
                     hi_open: bool = False, integer: bool = False, optional: bool = False) -> None:
        """ValueError naming the field and its allowed range unless lo (<|<=) value (<|<=) hi
        (None is allowed too with `optional`)."""
        value = getattr(self, name)
        if optional and value is None:
            return
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        allowed = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{')' if hi_open or hi is None else ']'}"
        if integer:
            allowed = "an integer in " + allowed
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(name, value, allowed)
        else:
            allowed = "a finite number in " + allowed
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self._fail(name, value, allowed)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            self._fail(name, value, allowed)
        if hi is not None and (value > hi or (hi_open and value == hi)):
            self._fail(name, value, allowed)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, getattr(self, name), "one of " + ", ".join(repr(c) for c in choices))

    def _check_bool(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, getattr(self, name), "True or False")

    def _check_memory(self) -> None:
        """remat, compute_dtype and scan_unroll (all three configs): `check_model_options`;
        the LoRA fields: `ppo_rlhf.lora.check_lora_options`, and `lora_roles` among the roles
        this config's trainer builds (`LORA_ROLES`)."""
        owner = type(self).__name__
        check_model_options(owner, self.remat, self.scan_unroll, self.compute_dtype)
        for name in ("lora_targets", "lora_roles"):
            object.__setattr__(self, name, lora_targets(getattr(self, name)))
        check_lora_options(owner, self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
        check_lora_base_dtype(owner, self.lora_base_dtype, self.compute_dtype, self.lora_rank)
        roles = self.lora_roles
        if (not isinstance(roles, tuple) or not roles or len(set(roles)) != len(roles)
                or any(r not in self.LORA_ROLES for r in roles)):
            self._fail("lora_roles", roles, f"distinct names among {', '.join(self.LORA_ROLES)} "
                       f"(the models {owner}'s trainer builds and trains)")

    def _check_optimiser(self) -> None:
        """The fields of the optimiser and the schedule (RMConfig, SFTConfig)."""
        self._check_range("learning_rate", 0.0, None)
        self._check_range("weight_decay", 0.0, None)
        self._check_range("adam_eps", 0.0, None)
        self._check_range("max_grad_norm", 0.0, None, lo_open=True, optional=True)
        self._check_choice("lr_schedule", LR_SCHEDULES)
        self._check_range("warmup_steps", 0, None, integer=True)
        self._check_range("min_lr_ratio", 0.0, 1.0)
        self._check_range("batch_size", 1, None, integer=True)
        self._check_range("max_length", 2, None, integer=True)
        self._check_range("seed", 0, 2**32 - 1, integer=True)
        self._check_range("eval_every", 0, None, integer=True)
        self._check_range("max_bad_updates", 1, None, integer=True)
        self._check_bool("append_eos")

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class PPOConfig(Config):
    """Hyperparameters of PPO-RLHF. Defaults follow TRL's PPO / "The N Implementation Details of
    RLHF with PPO" unless a comment says otherwise."""

    LORA_ROLES = ("policy", "critic")

    # ---- policy loss (seed eqs. 4.1-4.3) -------------------------------------------------------
    policy_loss: PolicyLossKind = "clip"
    """"pg": eq. 4.1, -log pi * A.  "is": eq. 4.2, -r * A.  "clip": eq. 4.3, -L_CLIP (default)."""
    clip_eps: float = 0.2
    """epsilon of eq. 4.3: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip epsilon for an asymmetric band (DAPO's "clip-higher"); None = clip_eps."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (Ye et al. 2020): for A < 0 the objective is bounded below by c*A,
    so a huge ratio on a bad token cannot blow up the loss. None = off."""

    # ---- value loss ----------------------------------------------------------------------------
    value_clip_eps: float | None = 0.2
    """Clipped value loss 0.5*max((V-R)^2, (V_old + clip(V-V_old, +-eps_v) - R)^2); None = the
    unclipped 0.5*(V-R)^2."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (TRL default 0.1)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (loss -= ent_coef * entropy). 0 = no bonus, as in TRL."""
    loss_agg: LossAgg = "token-mean"
    """How per-token losses become a scalar: "token-mean" = sum over all real tokens of the
    minibatch / their count (default); "seq-mean-token-mean" = mean over sequences of each
    sequence's token mean (long responses weigh the same as short ones);
    "seq-mean-token-sum-norm" = each sequence's token sum over the constant max_new_tokens,
    averaged over sequences (Dr. GRPO: no length normalisation, a divisor that never changes).
    Every mode is exact under gradient accumulation (`masked.aggregation_count`)."""

    importance_level: ImportanceLevel = "token"
    """"token": one importance ratio per token (PPO). "sequence": one per sequence, the
    length-normalised exp(mean_t(log pi - log pi_old)), clipped per sequence (GSPO, Zheng et al.
    2025; `losses.policy_loss`)."""
    kl_loss_coef: float = 0.0
    """Weight of a KL(pi || pi_ref) term in the LOSS (as GRPO), besides or instead of the KL in
    the reward (`kl_coef`); 0 = none. Estimated per token by `kl_loss_estimator` and aggregated
    as the policy loss (`loss_agg`)."""
    kl_loss_estimator: str = "k2"
    """The KL-in-the-loss estimator: "k2" (default), "k1+" or "k3+" -- the ones whose expected
    gradient under on-policy samples is the gradient of KL(pi || pi_ref); "k1" (expected gradient
    0) and "k3" (the gradient of the reverse KL) are allowed for comparison with published code
    (docs/formulas.md, "KL in the loss"; tests/test_kl_gradient.py)."""

    # ---- rewards, KL and advantages ------------------------------------------------------------
    advantage_estimator: AdvantageEstimator = "gae"
    """"gae": PPO -- per-token KL-shaped rewards, a critic, GAE (default). Critic-free (no critic
    is built or trained; `advantages.py`): "grpo" (each sequence's return minus its group's
    mean, over the group's unbiased std), "dr_grpo" (minus the mean only), "rloo" (minus the mean
    of the group's other samples), "reinforce_pp" (REINFORCE++: discounted reward-to-go of the
    KL-shaped rewards, whitened over the batch) and "reinforce_pp_baseline" (its group-mean
    baseline first). A sequence's return is its score minus kl_coef times its summed KL. The
    group estimators need num_generations >= 2."""
    num_generations: int = 1
    """Responses sampled per prompt (G): an iteration samples batch_size * G responses, each
    prompt's G adjacent (`rollout_size`); minibatches and micro-batches split those responses."""
    gamma: float = 1.0
    """GAE discount. 1.0: the episode is one short response; no discounting (TRL default)."""
    lam: float = 0.95
    """GAE lambda (TRL default)."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL(pi || pi_ref) estimator in the reward: k1 = log p - log q (unbiased, the
    classic RLHF penalty), k2 = 0.5 (log p - log q)^2, k3 = (q/p - 1) - log(q/p) (>= 0)."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta (TRL default 0.05)."""
    adaptive_kl: bool = False
    """False: beta stays kl_coef. True: Ziegler et al.'s proportional controller,
    e = clip(KL/target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)."""
    kl_target: float = 6.0
    """Target KL for the adaptive controller, in kl_units (Ziegler et al.: 6 nats per sequence)."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in samples (Ziegler et al.: 10000)."""
    kl_units: KLUnits = "seq-sum"
    """The KL the adaptive controller sees: "seq-sum" = mean over samples of the per-sequence sum
    (Ziegler et al.), "token-mean" = mean over all real tokens."""
    whiten_rewards: bool = False
    """Whiten the shaped per-token rewards (masked, shift_mean=False) before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages (masked) after GAE. Returns are computed before whitening."""
    advantages_shift_mean: bool = True
    """When whitening advantages, also remove their mean (True) or keep it (False)."""
    whiten_unbiased: bool = False
    """Variance used for whitening: biased (divide by n; default) or unbiased (n - 1)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that ends without EOS (TRL's missing_eos_penalty);
    None = no penalty. The score always lands on the last real response token (the EOS itself
    when present); tokens after EOS are masked out of every loss and statistic. A reward MODEL
    was trained on EOS-terminated text, so its score of a cut-off response is extrapolation:
    with None, the trainer warns once when that happens (set a penalty, e.g. TRL's 1.0)."""

    # ---- sampling ------------------------------------------------------------------------------
    temperature: float = 0.7
    """Sampling temperature. Log-probs of policy AND reference are taken from logits/temperature
    too, or KL and ratios are wrong (negative KL: trl#2358)."""
    top_k: int = 0
    """Top-k filter for sampling; 0 = off. PPO assumes samples come from pi itself: keep it off
    unless you know why."""
    top_p: float = 1.0
    """Nucleus filter for sampling; 1.0 = off (same caveat as top_k)."""
    max_new_tokens: int = 32
    """Response length budget (static shape: generation always runs this many steps)."""
    max_prompt_len: int = 64
    """Prompts are left-padded to this length (static shape); longer prompts are truncated from
    the left with a warning."""

    # ---- loop ----------------------------------------------------------------------------------
    batch_size: int = 16
    """Prompts per PPO iteration (responses: batch_size * num_generations, `rollout_size`)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (K)."""
    num_minibatches: int = 1
    """Minibatches per epoch (M); rollout_size must be divisible by it."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch whose gradients are summed before one optimiser step."""
    learning_rate: float = 1e-5
    """AdamW learning rate for policy and critic."""
    adam_eps: float = 1e-5
    """AdamW epsilon (added outside the square root in both optax and torch)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping: ONE norm over policy and critic together (torch's
    clip_grad_norm_ formula, g * min(1, max_norm / (norm + 1e-6))); None = off."""
    num_iterations: int = 100
    """PPO iterations (rollout + update) that .train() runs."""
    seed: int = 0
    """Seed of every random stream (sampling, minibatch order, head init)."""
    max_bad_updates: int = 3
    """A non-finite loss or gradient skips that update; this many in a row stop training."""

    # ---- memory --------------------------------------------------------------------------------
    remat: Remat = "none"
    """Activation checkpointing of the transformer layers of the models the update differentiates
    (policy and critic; the frozen reference and reward model never are). "none" keeps every
    intermediate of every layer for the backward (fastest, most memory); "full" keeps only each
    layer's input and recomputes the layer's whole forward in the backward (activation memory
    ~ one [batch, length, hidden] per layer, ~1/3 more compute); "dots" keeps the outputs of
    the weight matmuls (q/k/v/o and MLP projections) and recomputes norms, activations and
    attention (MaxText's "minimal"). The gradients are the same with any of the three up to
    float32 rounding; only memory and time change. JAX: the policy of the scan over layers
    (`ppo_jax.models.stack`); torch: `torch.utils.checkpoint` around each decoder layer, "dots"
    with selective checkpointing (`ppo_torch.models.remat`)."""

    logprob_chunk: int = 0
    """Response positions per chunk of the LM head + float32 log-softmax (+ entropy) in the
    update's and the rollout's log-prob passes; 0 = no chunking (the whole [batch, response,
    vocab] float32 logits at once). With chunk c, only [batch, c, vocab] float32 logits are live
    at a time, forward and backward (each chunk is recomputed in the backward: JAX
    `jax.checkpoint` in a `lax.map`, torch `torch.utils.checkpoint`); JAX pads the response to a
    multiple of c (static shapes). Same log-probs and entropies, gradients equal up to float32
    rounding. Worth it for large vocabularies (Qwen: 151,936 columns): e.g. 32-128."""
    compute_dtype: str | None = None
    """Mixed precision: the dtype of the matmuls ("bfloat16" or "float16"; "float32" too) while
    the weights keep their own dtype (the trainer's `dtype`, float32 by default: float32 master
    weights and optimiser state). None = compute in the weights' dtype (no mixed precision).
    Norms, softmaxes, the residual stream, logits, log-softmax, losses and advantages stay
    float32. JAX: every projection casts its input and weight to compute_dtype and accumulates
    in float32 (`ppo_jax.models.precision`); torch: `torch.autocast` around the backbones of
    every forward (`ppo_torch.models.precision`). Every model is built with it
    (`ModelOptions`)."""
    frozen_dtype: str | None = None
    """The dtype of the frozen models -- the reference and the reward model -- ("float32" or
    "bfloat16"): their weights AND activations, as if loaded with that dtype (norms, softmaxes,
    log-probs and scores stay float32). None = the trainer's `dtype` (float32 by default). They
    are never differentiated, so bfloat16 halves their memory with no float32 master copy
    needed; the critic (copied from the reward model) keeps the trainer's dtype. JAX:
    `ppo_jax.models.cast_model`; torch: `module.to(dtype)`."""
    scan_unroll: bool = False
    """JAX: run the scan over the transformer layers fully unrolled, in every model of the
    trainer (`ppo_jax.models.stack`, `ModelOptions`): the same arithmetic without the loop and
    its per-layer weight slices, faster for shallow models on CPU, but each program grows with
    depth again (compile time ~ layers). torch: no effect (its layers are a Python loop)."""
    lora_rank: int = 0
    """LoRA: 0 = train the whole models (the default); R > 0 = the models of `lora_roles` get
    rank-R adapters on `lora_targets` and only the adapters are trained, the base weights frozen
    (`ModelOptions`, `ppo_rlhf.lora`)."""
    lora_alpha: float = 8.0
    """The adapters' term is scaled by lora_alpha / lora_rank (peft's `lora_alpha`, default 8)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (peft's `lora_dropout`) in the update's forwards only (not in
    generation, the rollout's log-probs and values, the reference); masks drawn from (seed,
    iteration, minibatch, micro-batch), so runs and resumes repeat them."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """The projections that get adapters: names among q, k, v, o, gate, up, down (a tuple, or
    "q,v"); `ppo_rlhf.lora.LORA_MODULES` maps them to each architecture's modules."""
    lora_base_dtype: str | None = None
    """None (the trainer's `dtype`) or "bfloat16" (needs compute_dtype="bfloat16"): the frozen base
    weights of the LoRA models stored in that dtype -- half their memory; the adapters and a
    trained head keep the trainer's dtype (float32) and the forward computes as with mixed
    precision (float32 residual stream, norms, log-probs). A field of its own, not
    `frozen_dtype`: that one casts whole frozen models, weights AND activations, while a LoRA
    model is trained and keeps float32 activations and trained weights (`ModelOptions`)."""
    lora_roles: tuple[str, ...] = ("policy",)
    """The models that get LoRA adapters: "policy" and / or "critic" (a critic-free estimator
    builds no critic). The reference and the reward model are never trained."""

    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form, JSON-serialisable notes that travel with the config (not used by the math)."""

    def __post_init__(self) -> None:
        self._check_choice("policy_loss", POLICY_LOSS_KINDS)
        self._check_range("clip_eps", 0.0, 1.0, lo_open=True, hi_open=True)
        self._check_range("clip_eps_high", 0.0, None, lo_open=True, optional=True)
        self._check_range("dual_clip", 1.0, None, lo_open=True, optional=True)
        self._check_range("value_clip_eps", 0.0, None, lo_open=True, optional=True)
        self._check_range("vf_coef", 0.0, None)
        self._check_range("ent_coef", 0.0, None)
        self._check_choice("loss_agg", LOSS_AGGS)
        self._check_choice("importance_level", IMPORTANCE_LEVELS)
        if self.importance_level == "sequence" and self.policy_loss == "pg":
            self._fail("importance_level", self.importance_level,
                       "'token' with policy_loss='pg' (a sequence ratio needs 'is' or 'clip')")
        self._check_range("kl_loss_coef", 0.0, None)
        self._check_choice("kl_loss_estimator", KL_LOSS_KINDS)
        self._check_choice("advantage_estimator", ADVANTAGE_ESTIMATORS)
        self._check_range("num_generations", 1, None, integer=True)
        if self.num_generations < 2 and self.advantage_estimator in GROUP_ADVANTAGE_KINDS + (
                "reinforce_pp_baseline",):
            self._fail("num_generations", self.num_generations,
                       f"an integer >= 2 with advantage_estimator={self.advantage_estimator!r} (a group "
                       f"baseline needs a group)")
        self._check_range("gamma", 0.0, 1.0)
        self._check_range("lam", 0.0, 1.0)
        self._check_choice("kl_estimator", KL_ESTIMATORS)
        self._check_range("kl_coef", 0.0, None)
        self._check_bool("adaptive_kl")
        self._check_range("kl_target", 0.0, None, lo_open=True)
        self._check_range("kl_horizon", 1, None, integer=True)
        self._check_choice("kl_units", KL_UNITS)
        self._check_bool("whiten_rewards", "whiten_advantages", "advantages_shift_mean", "whiten_unbiased")
        self._check_range("missing_eos_penalty", None, None, optional=True)
        self._check_range("temperature", 0.0, None, lo_open=True)
        self._check_range("top_k", 0, None, integer=True)
        self._check_range("top_p", 0.0, 1.0, lo_open=True)
        self._check_range("max_new_tokens", 1, None, integer=True)
        self._check_range("max_prompt_len", 1, None, integer=True)
        self._check_range("batch_size", 1, None, integer=True)
        self._check_range("ppo_epochs", 1, None, integer=True)
        self._check_range("num_minibatches", 1, None, integer=True)
        self._check_range("grad_accum_steps", 1, None, integer=True)
        if self.rollout_size % self.num_minibatches:
            self._fail("num_minibatches", self.num_minibatches,
                  f"a divisor of rollout_size = batch_size * num_generations = {self.rollout_size}")
        if (self.rollout_size // self.num_minibatches) % self.grad_accum_steps:
            self._fail("grad_accum_steps", self.grad_accum_steps,
                  f"a divisor of the minibatch size {self.rollout_size // self.num_minibatches}")
        self._check_range("learning_rate", 0.0, None)
        self._check_range("adam_eps", 0.0, None)
        self._check_range("weight_decay", 0.0, None)
        self._check_range("max_grad_norm", 0.0, None, lo_open=True, optional=True)
        self._check_range("num_iterations", 0, None, integer=True)
        self._check_range("seed", 0, 2**32 - 1, integer=True)
        self._check_range("max_bad_updates", 1, None, integer=True)
        self._check_memory()
        if self.lora_rank and "critic" in self.lora_roles and not self.uses_critic:
            self._fail("lora_roles", self.lora_roles, f"no 'critic' with advantage_estimator="
                       f"{self.advantage_estimator!r} (it builds no critic)")
        self._check_range("logprob_chunk", 0, None, integer=True)
        if self.frozen_dtype is not None:
            self._check_choice("frozen_dtype", FROZEN_DTYPES)
        if not isinstance(self.extra, dict):
            self._fail("extra", self.extra, "a dict")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def rollout_size(self) -> int:
        """Responses per iteration: batch_size prompts x num_generations each."""
        return self.batch_size * self.num_generations

    @property
    def uses_critic(self) -> bool:
        """Does the estimator need a critic (GAE)? Critic-free ones build none."""
        return self.advantage_estimator == "gae"

    @property
    def minibatch_size(self) -> int:
        return self.rollout_size // self.num_minibatches

    @property
    def microbatch_size(self) -> int:
        return self.minibatch_size // self.grad_accum_steps


@dataclass(frozen=True)
class RMConfig(Config):
    """Hyperparameters of reward-model training (see the module docstring for the losses)."""

    LORA_ROLES = ("reward",)

    loss: RMLoss = "bradley_terry"
    """"bradley_terry" (pairs), "plackett_luce" (K-wise rankings), "best_of_k" (softmax choice of
    the best of K) or "rating" (MSE on standardised ratings)."""
    ties: str = "drop"
    """"drop": ties give no loss term (and no accuracy pair); "keep": tied pairs are pulled
    together (-log sigma(d)/2 - log sigma(-d)/2; Breslow's rule in plackett_luce / best_of_k)."""
    margin_key: str | None = None
    """bradley_terry only: read a margin from each record's extra[margin_key] (a number; records
    without it are an error); the loss becomes -log sigma(s_chosen - s_rejected - margin)."""
    learning_rate: float = 3e-4
    """AdamW learning rate (peak, after warm-up). 3e-4 suits the ~1M-parameter demo model (1e-4
    underfits it, 1e-3 is noisier); use ~1e-5 for models of 100M+ parameters."""
    num_epochs: int = 1
    """Passes over the training records (reward models overfit fast: 1-2 is usual)."""
    batch_size: int = 16
    """Records (groups) per optimiser step."""
    max_length: int = 128
    """Tokens per prompt + response sequence (static shape; longer ones lose their start). A
    GPT-2 model (learned positions) refuses more than its n_positions."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to every parameter, as torch.optim.AdamW)."""
    adam_eps: float = 1e-8
    """AdamW epsilon, added to sqrt(v_hat) (outside the root) in both backends."""
    max_grad_norm: float | None = 1.0
    """Global-norm gradient clipping (torch's formula in both backends); None = off."""
    lr_schedule: str = "linear"
    """After warm-up: "constant", "linear" (to min_lr_ratio * lr; TRL's default shape) or "cosine"."""
    warmup_steps: int = 0
    """Linear warm-up from lr / warmup_steps to lr over this many steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the linear / cosine decay, as a fraction of learning_rate."""
    seed: int = 0
    """Seeds the batch order, the hold-out split and a fresh score head (scalar_model_from_lm)."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0 = num_epochs full epochs)."""
    eval_every: int = 0
    """Evaluate on the held-out set every this many steps (0 = at the end of each epoch only)."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for evaluation, with all their records, when no eval set is
    given (seeded; `ppo_rlhf.runtime.split`)."""
    normalise: bool = True
    """After training, set reward_gain / reward_bias so reference scores have mean 0, std 1."""
    append_eos: bool = True
    """Append the tokenizer's EOS to each response (PPO scores responses at their EOS)."""
    max_bad_updates: int = 3
    """A non-finite loss or gradient skips that step; this many in a row stop training."""
    remat: Remat = "none"
    """Activation checkpointing of the model's transformer layers in the backward: "none",
    "full" (recompute each layer) or "dots" (keep the weight matmuls' outputs, recompute the
    rest); see `PPOConfig.remat`. Same gradients up to float32 rounding, less memory."""
    compute_dtype: str | None = None
    """Mixed precision: matmuls in "bfloat16" / "float16" ("float32" too) while the weights and
    the optimiser state keep the trainer's `dtype`; None = the weights' dtype. See
    `PPOConfig.compute_dtype`."""
    scan_unroll: bool = False
    """JAX: the scan over layers fully unrolled; see `PPOConfig.scan_unroll`. torch: no effect."""
    lora_rank: int = 0
    """As `PPOConfig.lora_rank`."""
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_base_dtype: str | None = None
    """As `PPOConfig.lora_base_dtype`."""
    lora_roles: tuple[str, ...] = ("reward",)
    """The models that get LoRA adapters: the reward model (the only one this trainer builds)."""

    def __post_init__(self) -> None:
        self._check_choice("loss", RM_LOSSES)
        self._check_choice("ties", TIES)
        if self.margin_key is not None:
            if not isinstance(self.margin_key, str) or not self.margin_key:
                self._fail("margin_key", self.margin_key, "None or a non-empty string")
            if self.loss != "bradley_terry":
                self._fail("margin_key", self.margin_key, "None unless loss='bradley_terry'")
        self._check_optimiser()
        self._check_memory()
        self._check_range("num_epochs", 1, None, integer=True)
        self._check_range("max_steps", 0, None, integer=True)
        self._check_range("eval_fraction", 0.0, 0.9)
        self._check_bool("normalise")


@dataclass(frozen=True)
class SFTConfig(Config):
    """Hyperparameters of causal-LM pretraining / supervised fine-tuning."""

    LORA_ROLES = ("policy",)

    learning_rate: float = 1e-3
    """AdamW peak learning rate (1e-3 for a ~1M-parameter model from scratch; ~1e-5 to fine-tune
    a large pretrained one)."""
    num_steps: int = 1000
    """Optimiser steps (full batches)."""
    batch_size: int = 32
    """Sequences per step."""
    max_length: int = 64
    """Tokens per sequence (static shape); longer examples lose their end. A GPT-2 model
    (learned positions) refuses more than its n_positions."""
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "cosine"
    """After warm-up: "constant", "linear" or "cosine" decay to min_lr_ratio * learning_rate."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    seed: int = 0
    """Seeds the example order."""
    eval_every: int = 0
    """Loss on the eval examples every this many steps (0 = only at the end)."""
    train_on_prompt: bool = False
    """(prompt, response) examples: also train on the prompt tokens (default: response only)."""
    append_eos: bool = True
    """Append EOS to every example, so the model learns to stop."""
    max_bad_updates: int = 3
    """A non-finite loss or gradient skips that step; this many in a row stop training."""
    remat: Remat = "none"
    """As `RMConfig.remat`."""
    compute_dtype: str | None = None
    """As `RMConfig.compute_dtype`."""
    scan_unroll: bool = False
    """As `RMConfig.scan_unroll` (JAX only)."""
    lora_rank: int = 0
    """As `PPOConfig.lora_rank`."""
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_base_dtype: str | None = None
    """As `PPOConfig.lora_base_dtype`."""
    lora_roles: tuple[str, ...] = ("policy",)
    """The models that get LoRA adapters: the language model being trained ("policy")."""

    def __post_init__(self) -> None:
        self._check_optimiser()
        self._check_memory()
        self._check_range("num_steps", 0, None, integer=True)
        self._check_bool("train_on_prompt")


__all__ = ["Config", "ModelOptions", "check_model_options", "PPOConfig", "RMConfig", "SFTConfig",
           "POLICY_LOSS_KINDS", "KL_ESTIMATORS", "KL_UNITS", "LOSS_AGGS", "ADVANTAGE_ESTIMATORS",
           "GROUP_ADVANTAGE_KINDS", "IMPORTANCE_LEVELS", "KL_LOSS_KINDS", "RM_LOSSES", "TIES", "LR_SCHEDULES", "REMATS",
           "COMPUTE_DTYPES", "FROZEN_DTYPES"]
