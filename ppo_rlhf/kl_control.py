"""The KL coefficient beta of the per-token penalty: fixed, or Ziegler et al.'s adaptive controller.

Host-side and backend-neutral: the controller sees one number per iteration (the rollout's KL in
the units of `PPOConfig.kl_units`, from the backend's `kl_for_controller`) and updates a Python
float in float64, so both backends' trainers use the very same arithmetic.

    e    = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)          (n_steps: samples in the iteration)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def adaptive_kl_update(kl_coef: float, current_kl: Any, n_steps: int, *, target: float,
                       horizon: int) -> float:
    """One step of Ziegler et al.'s (2019) proportional controller (float64)."""
    error = float(np.clip(float(current_kl) / target - 1.0, -0.2, 0.2))
    return float(kl_coef) * (1.0 + error * n_steps / horizon)


class AdaptiveKLController:
    """beta moved towards `target` KL by `adaptive_kl_update` once per iteration."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: Any, n_steps: int) -> float:
        self.value = adaptive_kl_update(self.value, current_kl, n_steps, target=self.target,
                                        horizon=self.horizon)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(AdaptiveKLController):
    """A beta that never changes (the same interface)."""

    def __init__(self, kl_coef: float):
        super().__init__(kl_coef, target=1.0, horizon=1)

    def update(self, current_kl: Any, n_steps: int) -> float:
        return self.value


def make_kl_controller(config: Any) -> AdaptiveKLController:
    """The controller a `PPOConfig` asks for (`adaptive_kl`, `kl_coef`, `kl_target`, `kl_horizon`)."""
    if config.adaptive_kl:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


__all__ = ["adaptive_kl_update", "AdaptiveKLController", "FixedKLController", "make_kl_controller"]
