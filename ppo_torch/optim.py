"""The optimiser of every PyTorch trainer (PPO, reward model, SFT). Mirror: `ppo_jax/optim.py`.

    optimizer = make_optimizer(params, learning_rate=1e-5, adam_eps=1e-8, weight_decay=0.0)
    loss.backward()
    grad_norm, ok = guarded_step(optimizer, params, loss, max_grad_norm=1.0)

* AdamW (torch.optim.AdamW: bias-corrected moments, eps added to sqrt(v_hat), decoupled weight
  decay on every parameter) -- what `ppo_jax.optim.make_optimizer` computes in the JAX twin;
* one global-norm clip over every gradient (torch.nn.utils.clip_grad_norm_: g * min(1, max_norm /
  (norm + 1e-6)); the JAX twin uses the same formula);
* the guard: a step whose loss or gradient norm is not finite is skipped (parameters and
  optimiser state untouched; `ok` False; the host loop counts such steps). Deciding it reads
  two numbers on the host: one sync per optimiser step, as torch.amp.GradScaler's inf check.
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def make_optimizer(parameters: Sequence[torch.nn.Parameter], *, learning_rate: float,
                   adam_eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (see the module docstring)."""
    return torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.999), eps=adam_eps,
                             weight_decay=weight_decay)


def clip_by_global_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float | None) -> Tensor:
    """Clip the gradients in place (torch's clip_grad_norm_); returns the global norm before
    clipping (a full tensor also under FSDP2, whose norm is a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, float("inf") if max_norm is None else max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def guarded_step(optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter],
                 loss: Tensor, *, max_grad_norm: float | None,
                 lr: float | None = None) -> tuple[Tensor, bool]:
    """Clip, then one AdamW step -- unless the loss or the gradient norm is not finite. `lr`:
    the host's scheduled learning rate (set in the param groups first). Returns (grad norm
    before clipping, ok)."""
    grad_norm = clip_by_global_norm(parameters, max_grad_norm)
    ok = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if ok:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step()
    return grad_norm, ok


__all__ = ["make_optimizer", "clip_by_global_norm", "guarded_step"]
