"""KL coefficient controllers: fixed, or adaptive towards a target KL (Ziegler et al. 2019, section 2.2).

The KL they see is the policy's KL to the reference per response, in nats: the sum over a response's tokens of the
per-token estimate, averaged over the responses of an update.
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, kl_per_response: float, n_episodes: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 3: beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2).

    K_beta = n_episodes / horizon: the coefficient moves by at most 20 % per `horizon` episodes, up when the KL is
    above the target and down when below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl_per_response: float, n_episodes: int) -> None:
        error = min(max(kl_per_response / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def build_kl_controller(
    init_kl_coef: float, kl_target: float | None, horizon: int
) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a target is given, fixed otherwise."""
    if kl_target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, kl_target, horizon)
