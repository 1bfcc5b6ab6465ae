"""PPO-Lagrangian (Safe RLHF, Dai et al. 2023, arXiv:2310.12773 §3.3; upstream
safe-rlhf/safe_rlhf/algorithms/ppo_lag/trainer.py): reward and cost streams with a critic each, the
actor on A = (A_R - lambda*A_C) / (1 + lambda), and lambda updated by SGD on -(J_C - d)*lambda
(eq. 31) before every actor update, J_C being the cross-process mean of a window of episode costs.

Its settings (config.rl.ppo_lag) are the constraint and its multiplier (LagrangeSettings, shared
with safe_grpo and safe_gspo) plus cost_per_token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.objectives import ppo
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.settings import AlgorithmSettings

# The host-side lambda bookkeeping, compiled once (eager jnp would compile op by op).
_push_costs = jax.jit(lagrange_lib.push_costs)
_window_mean = jax.jit(lagrange_lib.window_mean)
_update_lagrange = jax.jit(lagrange_lib.update_lagrange,
                           static_argnames=("threshold", "lambda_lr", "lambda_max", "delay_steps"))


@dataclasses.dataclass(frozen=True)
class LagrangeSettings(AlgorithmSettings):
    """The constraint (mean episode cost <= threshold) and its Lagrange multiplier (upstream
    scripts/ppo-lag.sh values)."""

    threshold: float = 0.0  # -d: the constraint is mean episode cost <= threshold
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float = 5.0  # <= 0: no cap
    lambda_update_delay_steps: int = 0
    # J_C = mean of the last N sequence costs of the whole run (every host's rows). Upstream keeps 128
    # per GPU and averages the GPUs: 128 x (number of upstream GPUs) reproduces it (rl/iteration.py).
    episode_cost_window_size: int = 128

    def check(self, where: str) -> None:
        super().check(where)
        if self.lambda_init <= 0:
            raise ValueError(f"{where}.lambda_init must be > 0 (lambda is kept in log space), got {self.lambda_init}")
        if self.episode_cost_window_size < 1:
            raise ValueError(f"{where}.episode_cost_window_size must be >= 1, got {self.episode_cost_window_size}")
        if self.lambda_update_delay_steps < 0:
            raise ValueError(f"{where}.lambda_update_delay_steps must be >= 0, got {self.lambda_update_delay_steps}")

    @property
    def lambda_cap(self) -> float | None:
        """lambda_max, or None (no cap) when it is <= 0 (a config field cannot hold None and stay
        overridable from the command line)."""
        return self.lambda_max if self.lambda_max > 0 else None


@dataclasses.dataclass(frozen=True)
class PPOLagSettings(LagrangeSettings):
    # With a moderation export as the cost model: False = the signal at the answer's end is the cost of
    # its last token (upstream); True = every response token t pays c_t = s_t - s_t-1, the change of the
    # streaming head's prefix score (s before the answer = 0), plus +beta*KL. The costs telescope to the
    # end score, so the return and the episode cost that lambda compares with the threshold stay
    # per-answer, while GAE credits the token that made the answer unsafe (potential-based shaping, Ng et
    # al. 1999: the optimal policy is unchanged). Raw prefix scores per token would instead charge every
    # later token again and grow with the answer's length.
    cost_per_token: bool = False


def lagrange_step(settings: LagrangeSettings, state: lagrange_lib.LagrangeState,
                  actor_step: int) -> tuple[lagrange_lib.LagrangeState, dict[str, float]]:
    """The lambda step before an actor update: J_C = the cross-process window mean. -> (state, metrics)."""
    episode_cost = lagrange_lib.cross_process_mean(_window_mean(state))
    state = _update_lagrange(state, episode_cost, actor_step, threshold=settings.threshold,
                             lambda_lr=settings.lambda_lr, lambda_max=settings.lambda_cap,
                             delay_steps=settings.lambda_update_delay_steps)
    return state, {"episode_cost": episode_cost}


@dataclasses.dataclass(frozen=True)
class PPOLagrangian(Algorithm):
    name: ClassVar[str] = "ppo_lag"
    scorers: ClassVar[tuple[str, ...]] = ("reward", "cost")
    streams: ClassVar[tuple[str, ...]] = ("reward", "cost")
    critics: ClassVar[tuple[str, ...]] = ("reward", "cost")
    settings: PPOLagSettings = PPOLagSettings()

    def token_streams(self, rl) -> tuple[str, ...]:
        return ("cost",) if self.settings.cost_per_token else ()

    def actor_advantages(self, rl, advantages, multiplier):
        return ppo.combined_advantages(advantages["reward"], advantages["cost"], multiplier)

    def init_state(self, rl) -> lagrange_lib.LagrangeState:
        return lagrange_lib.init_lagrange(self.settings.lambda_init, self.settings.episode_cost_window_size)

    def observe(self, rl, state, local_scores: dict[str, np.ndarray]):
        # The window holds the current batch before any lambda step (upstream: episode_costs are
        # extended in post_rollout, before the rl_steps of the batch).
        return _push_costs(state, local_scores["cost"])

    def before_update(self, rl, state, actor_step: int):
        return lagrange_step(self.settings, state, actor_step)

    def multiplier(self, rl, state):
        return lagrange_lib.lagrange_multiplier(state)
