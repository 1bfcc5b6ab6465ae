"""PPO-Lagrangian (Safe RLHF, spec §5.8): reward and cost streams with a critic each, the actor on
A = (A_R - lambda*A_C) / (1 + lambda), and lambda updated by SGD on -(J_C - d)*lambda before every
actor update, J_C being the cross-process mean of a window of episode costs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.objectives import ppo
from jaxalign.rl.algorithms.base import Algorithm

# The host-side lambda bookkeeping, compiled once (eager jnp would compile op by op).
_push_costs = jax.jit(lagrange_lib.push_costs)
_window_mean = jax.jit(lagrange_lib.window_mean)
_update_lagrange = jax.jit(lagrange_lib.update_lagrange,
                           static_argnames=("threshold", "lambda_lr", "lambda_max", "delay_steps"))


@dataclasses.dataclass(frozen=True)
class PPOLagrangian(Algorithm):
    name: ClassVar[str] = "ppo_lag"
    scorers: ClassVar[tuple[str, ...]] = ("reward", "cost")
    streams: ClassVar[tuple[str, ...]] = ("reward", "cost")
    critics: ClassVar[tuple[str, ...]] = ("reward", "cost")

    def token_streams(self, settings) -> tuple[str, ...]:
        return ("cost",) if settings.cost_per_token else ()

    def actor_advantages(self, settings, advantages, multiplier):
        return ppo.combined_advantages(advantages["reward"], advantages["cost"], multiplier)

    def init_state(self, settings) -> lagrange_lib.LagrangeState:
        return lagrange_lib.init_lagrange(settings.lambda_init, settings.episode_cost_window_size)

    def observe(self, settings, state, local_scores: dict[str, np.ndarray]):
        # The window holds the current batch before any lambda step (spec §5.8).
        return _push_costs(state, local_scores["cost"])

    def before_update(self, settings, state, actor_step: int):
        episode_cost = lagrange_lib.cross_process_mean(_window_mean(state))
        state = _update_lagrange(state, episode_cost, actor_step, threshold=settings.threshold,
                                 lambda_lr=settings.lambda_lr, lambda_max=settings.lambda_max,
                                 delay_steps=settings.lambda_update_delay_steps)
        return state, {"episode_cost": episode_cost}

    def multiplier(self, settings, state):
        return lagrange_lib.lagrange_multiplier(state)
