"""The optimiser of every JAX trainer (PPO, reward model, SFT). Mirror: `ppo_torch/optim.py`.

    tx = make_optimizer(learning_rate=1e-5, adam_eps=1e-8, weight_decay=0.0)
    params, opt_state, grad_norm, ok = guarded_step(tx, params, opt_state, grads, loss,
                                                    max_grad_norm=1.0)

* AdamW with torch.optim.AdamW's semantics: bias-corrected moments, eps added to sqrt(v_hat)
  (optax's eps_root = 0), decoupled weight decay lr * wd * param on every parameter. The bias
  corrections 1 - b^t are computed as -expm1(t * log b) with log b taken on the host in float64
  (`scale_by_adam`), not as optax does, 1 - b^t from b rounded to the weights' dtype: in float32
  0.999 becomes 0.99900001287, so optax's 1 - b2^t is 1.3-2e-5 too small for t < ~1000 and every
  step is ~1e-5 (relative) shorter than torch's, which computes the corrections in Python
  floats -- a systematic error, the same sign on every weight, that shows in everything the
  updated model computes;
* one global-norm clip over every gradient, with torch's clip_grad_norm_ formula
  g * min(1, max_norm / (norm + 1e-6)) (optax's clip_by_global_norm has no 1e-6);
* the guard: a step whose loss or gradient norm is not finite leaves parameters and optimiser
  state untouched (`ok` False; the host loop counts such steps). The update runs inside
  `lax.cond`, so the skipped branch costs nothing and no second copy of the parameters and
  optimiser state is held (a `jnp.where` between old and new would keep both alive).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def bias_correction(decay: float, count: Array, dtype: Any) -> Array:
    """1 - decay**count, accurate to `dtype`'s rounding: -expm1(count * log(decay)), the
    logarithm taken in float64 on the host (see the module docstring)."""
    wide = jnp.promote_types(dtype, jnp.float32)  # bf16 moments: the correction in float32
    return (-jnp.expm1(count.astype(wide) * math.log(decay))).astype(dtype)


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """optax.scale_by_adam(b1, b2, eps, eps_root=0) with accurate bias corrections
    (`bias_correction`); the same state (optax.ScaleByAdamState), so checkpoints are shared."""

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                                      nu=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)

        def direction(m, v):
            m_hat = m / bias_correction(b1, count, m.dtype)
            v_hat = v / bias_correction(b2, count, v.dtype)
            return m_hat / (jnp.sqrt(v_hat) + eps)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(*, learning_rate: float, adam_eps: float, weight_decay: float) -> optax.GradientTransformation:
    """AdamW (see the module docstring): optax.adamw's chain with our `scale_by_adam`. The RM
    and SFT trainers build it at learning rate 1 and scale its update by the host's scheduled
    rate (`guarded_step(lr=...)`), exactly what optax's scale_by_learning_rate does."""
    return optax.chain(scale_by_adam(b1=0.9, b2=0.999, eps=adam_eps),
                       optax.add_decayed_weights(weight_decay),
                       optax.scale_by_learning_rate(learning_rate))


def clip_by_global_norm(grads: Any, max_norm: float | None) -> tuple[Any, Array]:
    """(grads * min(1, max_norm / (norm + 1e-6)), the global norm before clipping)."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def guarded_step(tx: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                 loss: Array, *, max_grad_norm: float | None,
                 lr: Any = None) -> tuple[Any, Any, Array, Array]:
    """Clip, then one AdamW step -- unless the loss or the gradient norm is not finite.
    Returns (params, opt_state, grad norm before clipping, ok). `lr` scales the update (a tx
    built at learning rate 1)."""
    grads, grad_norm = clip_by_global_norm(grads, max_grad_norm)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        if lr is not None:
            updates = jax.tree.map(lambda u: lr * u, updates)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(ok, step, lambda p, s, g: (p, s), params, opt_state, grads)
    return params, opt_state, grad_norm, ok


__all__ = ["make_optimizer", "scale_by_adam", "bias_correction", "clip_by_global_norm", "guarded_step"]
