"""The Lagrange multiplier of PPO-Lagrangian and its episode-cost window (Safe RLHF, Dai et al. 2023,
arXiv:2310.12773 eq. 31; upstream safe-rlhf/safe_rlhf/algorithms/ppo_lag/trainer.py).

lambda lives in log space (lambda = e^eta >= 0) and is updated by SGD on
    lambda_loss = -(J_C - threshold) * exp(log_lambda)
i.e. log_lambda <- log_lambda + lr * (J_C - threshold) * lambda (eq. 31 with J_C = E[C] + d and
threshold = -d), then capped at log(lambda_max).
J_C is the mean of the last `window_size` sequence costs seen by this process (a ring buffer that
already holds the current batch), averaged over processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


class LagrangeState(NamedTuple):
    """log_lambda [] f32; cost_window [W] f32 (ring buffer); window_count [] i32 (filled slots,
    at most W); window_pos [] i32 (next slot to write)."""

    log_lambda: jax.Array
    cost_window: jax.Array
    window_count: jax.Array
    window_pos: jax.Array


def init_lagrange(lambda_init: float, window_size: int) -> LagrangeState:
    """log_lambda = ln(lambda_init) and an empty window of `window_size` costs."""
    if lambda_init <= 0.0:
        raise ValueError(f"lambda_init must be > 0 (lambda is kept in log space), got {lambda_init}")
    return LagrangeState(
        log_lambda=jnp.asarray(math.log(lambda_init), jnp.float32),
        cost_window=jnp.zeros((window_size,), jnp.float32),
        window_count=jnp.asarray(0, jnp.int32),
        window_pos=jnp.asarray(0, jnp.int32),
    )


def lagrange_multiplier(state: LagrangeState) -> jax.Array:
    """lambda = exp(log_lambda). []."""
    return jnp.exp(state.log_lambda)


def push_costs(state: LagrangeState, costs: jax.Array) -> LagrangeState:
    """Append sequence costs [N] to the ring buffer, dropping the oldest beyond its size."""
    window_size = state.cost_window.shape[0]
    costs = jnp.asarray(costs, jnp.float32).reshape(-1)[-window_size:]  # only the newest W can stay
    slots = (state.window_pos + jnp.arange(costs.shape[0])) % window_size
    return state._replace(
        cost_window=state.cost_window.at[slots].set(costs),
        window_count=jnp.minimum(state.window_count + costs.shape[0], window_size),
        window_pos=(state.window_pos + costs.shape[0]) % window_size,
    )


def window_mean(state: LagrangeState) -> jax.Array:
    """Mean of the filled slots of the cost window (0 when empty). []."""
    filled = jnp.arange(state.cost_window.shape[0]) < state.window_count
    total = jnp.sum(jnp.where(filled, state.cost_window, 0.0))
    return total / jnp.maximum(state.window_count, 1).astype(jnp.float32)


def cross_process_mean(value: jax.Array | float) -> float:
    """Mean of a scalar over all processes (the identity with one process)."""
    gathered = multihost_utils.process_allgather(np.asarray(value, np.float32))
    return float(np.mean(gathered))


def lambda_step(log_lambda: jax.Array, episode_cost: jax.Array, threshold: float,
                lambda_lr: float, lambda_max: float | None) -> jax.Array:
    """One SGD step on lambda_loss = -(J_C - threshold)*exp(log_lambda), then the cap. []."""
    grad = jax.grad(lambda x: -(episode_cost - threshold) * jnp.exp(x))(log_lambda)
    new_log_lambda = log_lambda - lambda_lr * grad
    if lambda_max is not None:
        new_log_lambda = jnp.minimum(new_log_lambda, math.log(lambda_max))
    return new_log_lambda


def update_lagrange(state: LagrangeState, episode_cost: jax.Array | float, step: int | jax.Array,
                    threshold: float, lambda_lr: float, lambda_max: float | None,
                    delay_steps: int) -> LagrangeState:
    """lambda step from the (process-averaged) window mean `episode_cost`, only once
    `step` (updates done so far) >= delay_steps."""
    stepped = lambda_step(state.log_lambda, jnp.asarray(episode_cost, jnp.float32), threshold,
                          lambda_lr, lambda_max)
    return state._replace(log_lambda=jnp.where(step >= delay_steps, stepped, state.log_lambda))
