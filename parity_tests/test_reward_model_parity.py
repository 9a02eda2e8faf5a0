"""Parity of supervised training: reward-model losses against a plain-numpy reference, and the
JAX and PyTorch trainers (reward model and SFT) against each other, step for step -- full
fine-tuning, and with LoRA (JAX's `LoRALinear` vs peft: the adapters and the RM's score head
trained, the base weights checked bit-identical to their start).

How the optimisers map (both backends call their `optim.make_optimizer` and `optim.clip_by_global_norm`):
- AdamW: `ppo_jax.optim.make_optimizer` (optax.adamw's chain, eps_root=0, with the bias corrections
  computed as -expm1(t log b)) and
  torch.optim.AdamW(lr, betas=(0.9, 0.999), eps, weight_decay=wd) compute the same update:
  m_t, v_t exponential moments; BOTH bias-corrected (m_hat = m_t / (1 - b1^t), v_hat = v_t /
  (1 - b2^t)); eps added OUTSIDE the square root (sqrt(v_hat) + eps; optax's eps_root=0);
  decoupled weight decay lr_t * wd * param applied to every parameter (optax adds wd * param to
  the Adam direction and scales the sum by lr_t; torch multiplies the param by 1 - lr_t * wd
  first -- the same arithmetic, as the Adam direction does not depend on the param).
- learning rate: `ppo_rlhf.runtime.supervised.lr_at(number of APPLIED updates, total)` computed on the
  host and handed to both steps: JAX multiplies the update of its AdamW at learning rate 1 by it
  (exactly what optax's scale_by_learning_rate does), torch sets it in the param groups.
- clipping: grads * min(1, max_norm / (global_norm + 1e-6)) (torch's clip_grad_norm_ formula;
  optax.clip_by_global_norm has no 1e-6, so it is not used).

Tolerances (float32), measured and explained:
- Same weights, same batch: the two backends' matmuls round differently (~1e-7 relative per op),
  so scores agree to ~1e-6, losses to ~2e-7 relative and each gradient tensor to ~4e-6 of its
  largest entry (GRAD_TOL = 1e-5). Exception: the final LayerNorm's bias shifts every score
  alike, which no preference loss sees -- its exact gradient is 0 (checked as such).
- After N AdamW steps, per weight entry, in FLOAT64 (WEIGHT_TOL_F64 = 1e-11; measured 7.5e-14).
  In float32 no fixed tolerance holds on every CPU: Adam divides each gradient by
  sqrt(v_hat) + eps, so an entry's update error is lr * (its gradient's rounding error) /
  sqrt(v_hat); the rounding error of a gradient entry is set by its tensor's scale (~4e-6 of
  max|g| in float32), not by the entry itself, so an entry whose gradient passes near 0 during
  training turns the backends' different summation orders into a large difference of its step
  (measured on one entry of h.0.mlp.c_fc: 5.8e-5 after 6 steps when torch's MKL takes its Intel
  AVX-512 GEMM kernels, 7.6e-6 with the generic ones). So each training test runs both backends
  in float64 AND float32, and every float32 quantity after a step (each step's loss and gradient
  norm, every updated weight entry) is checked against the float32 rounding of the two runs,
  measured against their float64 twins (`ppo_inputs.explained_by_rounding`): an amplified entry
  gets the bound its own rounding earns, every other entry a tight one.
  Entries whose exact gradient is 0 (`null_entries`) get full-size steps of random sign from
  Adam in either precision and are compared separately.
- The losses (f64: 1e-12; f32: 1e-6 relative) match the numpy reference exactly up to rounding.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ppo_jax.reward_model as jrm
import ppo_torch.reward_model as trm
from parity_tests.ppo_inputs import explained_by_rounding, explained_weights
from ppo_rlhf.config import RMConfig, SFTConfig
from ppo_rlhf.data.encoding import encode_preferences

LOSSES = ("bradley_terry", "plackett_luce", "best_of_k")


# ---- plain-numpy reference -----------------------------------------------------------------------
def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


def ref_group_loss(scores, tiers, margin, targets, loss, ties):
    """One group at a time, one formula per line (see ppo_rlhf.supervised's docstring)."""
    out = []
    for s, t, m, z in zip(scores, tiers, margin, targets):
        idx = [i for i in range(len(t)) if t[i] >= 0]
        if loss == "rating":
            out.append((s[0] - z) ** 2)
        elif loss == "bradley_terry":
            terms = [neg_log_sigmoid(s[i] - s[j] - m) for i in idx for j in idx if t[i] < t[j]]
            if ties == "keep":
                terms += [0.5 * neg_log_sigmoid(s[i] - s[j]) + 0.5 * neg_log_sigmoid(s[j] - s[i])
                          for i in idx for j in idx if i < j and t[i] == t[j]]
            out.append(sum(terms) / len(terms) if terms else 0.0)
        else:  # Plackett-Luce: -log prod_i [exp(s_i) / sum_{j in R_i} exp(s_j)] ^ (1 / |tier(i)|)
            total = 0.0
            for i in idx:
                if loss == "best_of_k" and t[i] != 0:
                    continue
                risk = [j for j in idx if j == i or t[j] > t[i] or (ties == "keep" and t[j] == t[i])]
                tier_size = sum(1 for j in idx if t[j] == t[i])
                total += -(s[i] - math.log(sum(math.exp(s[j]) for j in risk))) / tier_size
            out.append(total)
    return np.asarray(out)


def random_groups(seed, B=6, K=4):
    """Scores, tiers with ties and absent slots (each group with >= 2 real slots), margins,
    targets."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 2, (B, K))
    tiers = np.full((B, K), -1)
    for b in range(B):
        k = rng.integers(2, K + 1)
        tiers[b, :k] = rng.integers(0, k, size=k)
        tiers[b, :k] -= tiers[b, :k].min()
    tiers[0, :2] = [0, 1]
    tiers[1, :3] = [1, 1, 0] if K >= 3 else tiers[1, :3]
    return scores, tiers, rng.normal(0, 0.5, B), rng.normal(0, 1, B)


@contextlib.contextmanager
def _x64(dtype):
    with (jax.enable_x64(True) if dtype == np.float64 else contextlib.nullcontext()):
        yield


def _jax_loss(scores, tiers, margin, targets, loss, ties, grad=True):
    with _x64(scores.dtype):
        if not grad:
            return np.asarray(jrm.group_loss(jnp.asarray(scores), jnp.asarray(tiers), jnp.asarray(margin),
                                             jnp.asarray(targets), loss=loss, ties=ties)), None
        f = lambda s: jnp.sum(jrm.group_loss(s, jnp.asarray(tiers), jnp.asarray(margin),
                                             jnp.asarray(targets), loss=loss, ties=ties) * jnp.arange(1, len(s) + 1))
        per = jrm.group_loss(jnp.asarray(scores), jnp.asarray(tiers), jnp.asarray(margin),
                             jnp.asarray(targets), loss=loss, ties=ties)
        return np.asarray(per), np.asarray(jax.grad(f)(jnp.asarray(scores)))


def _torch_loss(scores, tiers, margin, targets, loss, ties, grad=True):
    s = torch.from_numpy(scores.copy()).requires_grad_(True)
    per = trm.group_loss(s, torch.from_numpy(tiers), torch.from_numpy(margin), torch.from_numpy(targets),
                         loss=loss, ties=ties)
    (per * torch.arange(1, len(scores) + 1, dtype=s.dtype)).sum().backward()
    return per.detach().numpy(), s.grad.numpy()


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("loss", LOSSES + ("rating",))
@pytest.mark.parametrize("ties", ["drop", "keep"])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_losses_match_numpy_reference_values_and_grads(dtype, tol, loss, ties, seed):
    scores, tiers, margin, targets = (x.astype(dtype) if x.dtype.kind == "f" else x
                                      for x in random_groups(seed))
    if loss == "rating":
        tiers = np.where(np.arange(tiers.shape[1]) == 0, 0, -1)[None].repeat(len(tiers), 0)
    want = ref_group_loss(scores.astype(np.float64), tiers, margin.astype(np.float64), targets, loss, ties)
    # reference gradient of sum_b (b + 1) * loss_b, by central differences in float64
    h, s64 = 1e-6, scores.astype(np.float64)
    w = np.arange(1, len(s64) + 1)
    num = np.zeros_like(s64)
    for idx in np.ndindex(*s64.shape):
        up, dn = s64.copy(), s64.copy()
        up[idx] += h
        dn[idx] -= h
        num[idx] = (w @ ref_group_loss(up, tiers, margin, targets, loss, ties)
                    - w @ ref_group_loss(dn, tiers, margin, targets, loss, ties)) / (2 * h)
    for name, fn in (("jax", _jax_loss), ("torch", _torch_loss)):
        val, grad = fn(scores, tiers, margin, targets, loss, ties)
        assert val.dtype == dtype and grad.dtype == dtype, name
        np.testing.assert_allclose(val, want, rtol=tol, atol=tol, err_msg=f"{name} value")
        # finite differences are good to ~1e-8 in float64
        np.testing.assert_allclose(grad, num, rtol=max(tol, 1e-6), atol=max(tol, 1e-6), err_msg=f"{name} grad")


def test_plackett_luce_is_a_distribution_over_rankings_and_reduces_to_bradley_terry():
    """exp(-PL loss) summed over all K! strict rankings is 1; best-of-K's over the K choices of the
    best is 1; for K = 2 all three losses are -log sigma(s_chosen - s_rejected)."""
    perms = np.array(list(itertools.permutations(range(4))))   # tiers = the rank of each response
    s = np.array([[0.3, -1.2, 2.0, 0.5]]).repeat(len(perms), 0)
    best = 1 - np.eye(4, dtype=np.int64)                          # response b alone in tier 0
    z = np.zeros(len(perms))
    for name, fn in (("jax", _jax_loss), ("torch", _torch_loss)):
        pl = fn(s, perms, z, z, "plackett_luce", "drop", grad=False)[0]
        assert np.exp(-pl).sum() == pytest.approx(1.0, abs=1e-12), name
        bok = fn(s[:4], best, z[:4], z[:4], "best_of_k", "drop", grad=False)[0]
        assert np.exp(-bok).sum() == pytest.approx(1.0, abs=1e-12), name
        pair = np.array([[1.5, -0.25]])
        for loss in LOSSES:
            v = fn(pair, np.array([[0, 1]]), z[:1], z[:1], loss, "drop", grad=False)[0][0]
            assert v == pytest.approx(neg_log_sigmoid(1.75), abs=1e-12), (name, loss)


# ---- models ------------------------------------------------------------------------------------
GRAD_TOL = 1e-5        # |g_jax - g_torch| <= GRAD_TOL * max|g| per tensor; measured <= 4e-6
WEIGHT_TOL_F64 = 1e-11  # absolute, per entry, after 6 float64 AdamW steps at lr 1e-3 (see top)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint("gpt2")))


@pytest.fixture(scope="module")
def rankings():
    from ppo_rlhf.tasks import reviews

    return reviews.preference_data(24, kind="ranking", k=3, seed=4).records


def _jax_grads(ckpt, batch, cfg):
    from flax import nnx

    from ppo_jax.models import scalar_model_from_lm
    from ppo_jax.models.loading import hf_names
    from ppo_jax.models.stack import stacked_modules

    model = scalar_model_from_lm(ckpt, seed=5)
    stacks = stacked_modules(model)
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    fn = jax.jit(jax.value_and_grad(lambda p, r, b: jrm.batch_loss(nnx.merge(gdef, p, r), b, loss=cfg.loss,
                                                                   ties=cfg.ties),
                                    has_aux=True))  # as the trainer runs it: under jit
    (loss, scores), grads = fn(params, rest, b)
    out = {}
    for path, v in nnx.to_flat_state(grads):
        names, transpose, stacked = hf_names(path, "gpt2", stacks)
        g = np.asarray(v[...])
        for name, a in zip(names, g if stacked else [g]):  # a stacked gradient: one per layer
            out[name] = a.T if transpose else a
    return float(loss), np.asarray(scores), out


def _torch_grads(ckpt, batch, cfg):
    from ppo_torch.models import scalar_model_from_lm

    model = scalar_model_from_lm(ckpt, seed=5)
    loss, scores = trm.batch_loss(model, trm._tensors(batch, torch.device("cpu")), loss=cfg.loss, ties=cfg.ties)
    loss.backward()
    return loss.item(), scores.detach().numpy(), {
        n.removeprefix("hf_model."): p.grad.numpy().copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss,ties", [("bradley_terry", "drop"), ("plackett_luce", "keep"),
                                       ("best_of_k", "drop")])
def test_same_init_same_batch_same_loss_and_gradients(tiny_checkpoint, tok, rankings, loss, ties):
    cfg = RMConfig(loss=loss, ties=ties, max_length=40)
    g = encode_preferences(rankings, tok, cfg)
    batch = g.batch(np.arange(8), np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32))
    lj, sj, gj = _jax_grads(tiny_checkpoint("gpt2"), batch, cfg)
    lt, st, gt = _torch_grads(tiny_checkpoint("gpt2"), batch, cfg)
    np.testing.assert_allclose(sj, st, rtol=1e-5, atol=1e-6)
    assert lj == pytest.approx(lt, rel=2e-6)
    assert set(gj) == set(gt)
    top = max(float(np.abs(v).max()) for v in gt.values())
    for k, null in null_entries(gt, preference=True).items():
        # exact gradient 0, both backends return rounding noise (~1e-9)
        assert np.abs(gj[k][null]).max() < 1e-6 * top and np.abs(gt[k][null]).max() < 1e-6 * top, k
    gj, gt = (without_null_entries(g, preference=True) for g in (gj, gt))
    for k in gj:
        if gj[k].size == 0:
            continue
        scale = float(np.abs(gt[k]).max())
        assert scale > 1e-4 * top, k  # every other parameter gets a real gradient
        np.testing.assert_allclose(gj[k], gt[k], rtol=0, atol=GRAD_TOL * scale, err_msg=k)


def null_entries(tensors, *, preference):
    """{name: bool mask} of GPT-2 parameter entries whose exact gradient is 0: the key part of
    every c_attn bias (q . (k + b) shifts all of a query's attention logits alike, which the
    softmax ignores) and, for a preference loss, the final LayerNorm's bias (it shifts every score
    by the same amount, which no preference loss sees). Rounding noise is all their gradient
    holds (~1e-9), and Adam normalises noise to full-size steps (m_hat / (sqrt(v_hat) + eps) ~ +-1
    with eps = 1e-8) in directions that differ between backends: such entries drift apart by up
    to ~lr per step without changing any output (or any preference), so weight parity is checked
    on the other entries."""
    H = tensors["transformer.ln_f.bias"].shape[0]
    out = {}
    for k, v in tensors.items():
        if k.endswith("attn.c_attn.bias"):
            out[k] = (np.arange(3 * H) >= H) & (np.arange(3 * H) < 2 * H)
        elif k == "transformer.ln_f.bias" and preference:
            out[k] = np.ones(H, bool)
    return out


def without_null_entries(tensors, *, preference):
    nulls = null_entries(tensors, preference=preference)
    return {k: (v[~nulls[k]] if k in nulls else v) for k, v in tensors.items()}


def _tensors_of(trainer):
    """The trainer's model under Hugging Face names, a LoRA model's adapters included (PEFT names
    and layout: <module>.lora_A.weight [rank, in], as `parity_tests.ppo_inputs.weights`)."""
    if trainer.backend == "jax":
        from ppo_jax.models import model_options, model_tensors
        from ppo_jax.models.lora import adapter_tensors
    else:
        from ppo_torch.models import model_options, model_tensors
        from ppo_torch.models.lora import adapter_tensors
    model = trainer.model()
    return {**model_tensors(model), **(adapter_tensors(model) if model_options(model).lora else {})}


def _x64_if(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _fit_both(kind, ckpt, cfg, data, dtype):
    """Train the same model in both backends with `dtype` weights: (jax trainer, torch trainer,
    start tensors, jax tensors, torch tensors). The JAX trainer lives in x64 mode for float64."""
    import ppo_jax.sft as jsft
    import ppo_torch.sft as tsft
    from ppo_jax.models import load_pretrained as jload
    from ppo_torch.models import load_pretrained as tload

    options = cfg.model_options(cfg.LORA_ROLES[0])  # the trained model's (LoRA or not)
    with _x64_if(dtype):
        model = (jrm.init_reward_model(ckpt, seed=cfg.seed, dtype=dtype, options=options) if kind == "rm"
                 else jload(ckpt, dtype, options=options))
        tj = (jrm.RewardModelTrainer if kind == "rm" else jsft.SFTTrainer)(model, cfg, tokenizer=ckpt)
        start = _tensors_of(tj)
        tj.fit(data, progress=False)
        wj = _tensors_of(tj)
    model = (trm.init_reward_model(ckpt, seed=cfg.seed, dtype=dtype, options=options) if kind == "rm"
             else tload(ckpt, dtype, options=options))
    tt = (trm.RewardModelTrainer if kind == "rm" else tsft.SFTTrainer)(model, cfg, tokenizer=ckpt,
                                                                       device="cpu")
    tt.fit(data, progress=False)
    wt = _tensors_of(tt)
    assert {v.dtype for v in wj.values()} == {v.dtype for v in wt.values()} == {np.dtype(dtype)}
    assert set(wj) == set(wt)
    return tj, tt, start, wj, wt


HISTORY_KEYS = ("train/loss", "train/grad_norm")


def _compare_histories(h, steps):
    """h: dtype -> (jax history, torch history). float64: each step's loss to 1e-12 and gradient
    norm to 1e-11 relative; float32: within the runs' own rounding (explained_by_rounding)."""
    (hj, ht), (Hj, Ht) = h["float32"], h["float64"]
    assert len(hj) == len(ht) == len(Hj) == len(Ht) == steps
    for a, b, A, B in zip(hj, ht, Hj, Ht):
        assert a["train/lr"] == b["train/lr"] == A["train/lr"] == B["train/lr"]
        for k in HISTORY_KEYS:
            explained_by_rounding(a[k], b[k], A[k], B[k], rtol=1e-11, atol=0.0, what=k)
        assert A["train/loss"] == pytest.approx(B["train/loss"], rel=1e-12)
        assert A["train/grad_norm"] == pytest.approx(B["train/grad_norm"], rel=1e-11)


def _compare_weights(w, start, *, preference):
    """w: dtype -> (jax tensors, torch tensors). float64: every entry (but the null ones) to
    WEIGHT_TOL_F64; float32: every such entry within the runs' own rounding (the module
    docstring says why)."""
    nj, nt, Nj, Nt, ns = (without_null_entries(x, preference=preference)
                          for x in (*w["float32"], *w["float64"], start))
    keys = [k for k in Nj if Nj[k].size]
    moved = max(float(np.abs(Nj[k] - ns[k]).max()) for k in keys)
    assert moved > 1e-3, moved  # the weights really moved: the comparison is not vacuous
    explained_weights(nj, nt, Nj, Nt, keys=keys)
    worst = max(float(np.abs(Nj[k] - Nt[k]).max()) for k in keys)
    assert worst < WEIGHT_TOL_F64, (worst, moved)


def test_adamw_steps_give_the_same_weights(tiny_checkpoint, rankings):
    cfg = RMConfig(loss="plackett_luce", learning_rate=1e-3, batch_size=4, max_length=40,
                   weight_decay=0.01, max_grad_norm=0.5, warmup_steps=2, lr_schedule="linear",
                   max_steps=6, normalise=False)
    runs = {dtype: _fit_both("rm", str(tiny_checkpoint("gpt2")), cfg, rankings, dtype)
            for dtype in ("float64", "float32")}
    _compare_histories({d: (r[0].history, r[1].history) for d, r in runs.items()}, 6)
    assert max(h["train/grad_norm"] for h in runs["float64"][0].history) > 0.5  # clipping was active
    _compare_weights({d: r[3:] for d, r in runs.items()}, runs["float64"][2], preference=True)
    # the null entries differ (see null_entries) but change no preference: the two float64
    # models' scores differ by one constant shift (the final LayerNorm bias), nothing else
    tj, tt = runs["float64"][:2]
    ids = np.random.default_rng(0).integers(4, 500, size=(6, 12))
    with jax.enable_x64(True):
        sj = np.asarray(tj.model().score(ids))
    with torch.no_grad():
        st = tt.model().score(torch.from_numpy(ids)).numpy()
    assert np.ptp(sj - st) < 1e-10, sj - st


@pytest.mark.parametrize("trained_in", ["jax", "torch"])
def test_reward_model_trained_in_one_backend_scores_the_same_in_the_other(tiny_checkpoint, tok,
                                                                           tmp_path, trained_in):
    from ppo_rlhf.tasks import reviews

    data = reviews.preference_data(16, seed=6).records
    cfg = RMConfig(learning_rate=1e-3, batch_size=8, max_length=40, eval_fraction=0.0)
    mod = jrm if trained_in == "jax" else trm
    t = mod.RewardModelTrainer(str(tiny_checkpoint("gpt2")), cfg, out_dir=tmp_path / "rm")
    m = t.fit(data, progress=False)
    g = encode_preferences(data, tok, cfg)
    ids, mask = g.input_ids[:, 0], g.attention_mask[:, 0]
    mj = jrm.init_reward_model(tmp_path / "rm")
    mt = trm.init_reward_model(tmp_path / "rm")
    for model in (mj, mt):
        assert (model.reward_gain, model.reward_bias) == (m["reward_gain"], m["reward_bias"])
    sj = np.asarray(mj.score(ids, mask))
    with torch.no_grad():
        st = mt.score(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(sj, st, atol=1e-5)
    # and the trainer's own model agrees with what it saved
    own = t.sequence_scores([r.prompt for r in data], [r.chosen for r in data])
    np.testing.assert_allclose(m["reward_gain"] * own + m["reward_bias"], sj, atol=1e-5)


# ---- SFT -----------------------------------------------------------------------------------------
def test_sft_steps_give_the_same_loss_and_weights(tiny_checkpoint):
    from ppo_rlhf.tasks import reviews

    pairs = reviews.generate_corpus(16, seed=3)
    examples = [pairs[i] if i % 2 else f"{pairs[i][0]} {pairs[i][1]}" for i in range(16)]
    cfg = SFTConfig(num_steps=6, batch_size=4, max_length=40, learning_rate=1e-3, weight_decay=0.01,
                    max_grad_norm=0.5, warmup_steps=2)
    runs = {dtype: _fit_both("sft", str(tiny_checkpoint("gpt2")), cfg, examples, dtype)
            for dtype in ("float64", "float32")}
    _compare_histories({d: (r[0].history, r[1].history) for d, r in runs.items()}, 6)
    for dtype, (tj, tt, *_rest) in runs.items():
        for a, b in zip(tj.history, tt.history):
            assert a["train/tokens"] == b["train/tokens"], dtype
    _compare_weights({d: r[3:] for d, r in runs.items()}, runs["float64"][2], preference=False)


# ---- LoRA: adapters on the trained model, the base frozen ----------------------------------------
LORA = dict(lora_rank=2, lora_alpha=6.0, lora_targets=("q", "v", "o", "up"))
"""Adapters on the fused q/v projection (c_attn), the attention output and the MLP's up
projection of the tiny GPT-2; alpha / rank = 3, so a wrong scaling changes every step."""


def _compare_lora_runs(runs, steps, *, head):
    """runs: dtype -> `_fit_both`'s tuple, LoRA models. The losses and gradient norms of every
    step as `_compare_histories`; the trained tensors -- the adapters, and a reward model's
    score head (`head`) -- after the steps as the full-model weights in `_compare_weights`
    (float64: every entry to WEIGHT_TOL_F64, float32: within the runs' own rounding); every base
    weight bit-identical to where it started, in both backends and both precisions. No entry is
    a null one here: the c_attn bias and the final LayerNorm (`null_entries`) are base weights,
    frozen; A's gradient is exactly 0 at the first step (B starts at 0) in both backends."""
    _compare_histories({d: (r[0].history, r[1].history) for d, r in runs.items()}, steps)
    for dtype, (_tj, _tt, start, wj, wt) in runs.items():
        trained = sorted(k for k in start if ".lora_" in k or (head and k == "score.weight"))
        assert any(".lora_A." in k for k in trained) and any(".lora_B." in k for k in trained)
        assert ("score.weight" in trained) == head
        for name, w in (("jax", wj), ("torch", wt)):
            frozen = [k for k in start if k not in trained]
            assert frozen and set(w) == set(start)
            moved = [k for k in frozen if not np.array_equal(w[k], start[k])]
            assert not moved, f"{name} {dtype}: base weights moved: {moved[:4]}"
    (nj, nt), (Nj, Nt) = runs["float32"][3:], runs["float64"][3:]
    start = runs["float64"][2]
    keys = sorted(k for k in start if ".lora_" in k or (head and k == "score.weight"))
    for kind in (".lora_A.", ".lora_B.") + ((".weight",) if head else ()):
        of_kind = [k for k in keys if kind in k and (kind != ".weight" or k == "score.weight")]
        moved = max(float(np.abs(Nj[k] - start[k]).max()) for k in of_kind)
        assert moved > 1e-4, (kind, moved)  # A (from the second step), B and the head all trained
    explained_weights(nj, nt, Nj, Nt, keys=keys)
    worst = max(float(np.abs(Nj[k] - Nt[k]).max()) for k in keys)
    assert worst < WEIGHT_TOL_F64, worst


def test_lora_reward_model_steps_give_the_same_adapters_and_head(tiny_checkpoint, rankings):
    """RMConfig with lora_rank: JAX (our LoRALinear) and torch (peft) train the same adapters
    and score head from the same start (A seeded by module name, B zero, the head seeded) --
    3 clipped AdamW steps with weight decay, float64 and float32 -- and neither moves a base
    weight."""
    cfg = RMConfig(loss="plackett_luce", learning_rate=1e-2, batch_size=4, max_length=40,
                   weight_decay=0.01, max_grad_norm=0.5, warmup_steps=1, lr_schedule="linear",
                   max_steps=3, normalise=False, **LORA)
    runs = {dtype: _fit_both("rm", str(tiny_checkpoint("gpt2")), cfg, rankings, dtype)
            for dtype in ("float64", "float32")}
    assert max(h["train/grad_norm"] for h in runs["float64"][0].history) > 0.5  # clipping was active
    _compare_lora_runs(runs, 3, head=True)


def test_lora_sft_steps_give_the_same_adapters(tiny_checkpoint):
    """SFTConfig with lora_rank: the same adapters after 3 steps in both backends, the base (its
    LM head included) unchanged."""
    from ppo_rlhf.tasks import reviews

    pairs = reviews.generate_corpus(12, seed=3)
    examples = [pairs[i] if i % 2 else f"{pairs[i][0]} {pairs[i][1]}" for i in range(12)]
    cfg = SFTConfig(num_steps=3, batch_size=4, max_length=40, learning_rate=1e-2, weight_decay=0.01,
                    max_grad_norm=0.5, warmup_steps=1, **LORA)
    runs = {dtype: _fit_both("sft", str(tiny_checkpoint("gpt2")), cfg, examples, dtype)
            for dtype in ("float64", "float32")}
    _compare_lora_runs(runs, 3, head=False)
