"""Multi-constraint PPO-Lagrangian: one Lagrange multiplier per constraint (issue 10).

Constraints i = 1..K, each a cost stream C_i with its own threshold d_i, window, initial lambda and
learning rate (e.g. P(severity 3) <= 1% and P(unsafe) <= 5% from one moderation model, or one per
harm category). Per constraint, exactly PPO-Lagrangian's rule (objectives/lagrange.py):

    J_i = mean of the last W_i episode costs of stream i (cross-process)
    log lambda_i <- log lambda_i + lr_i * (J_i - d_i) * lambda_i        (capped at lambda_max)

and the actor's advantage generalises (A_R - lambda A_C) / (1 + lambda) to

    A = (A_R - sum_i lambda_i A_Ci) / (1 + sum_i lambda_i)

so a constraint that holds lets its lambda_i decay towards 0 while a binding one grows. Every cost
stream is KL-shaped like the cost stream (+beta*KL) and has its own critic ("<name>_critic"); with
config.rl.cost_per_token every constraint's cost comes per token from the streaming moderation head
(base.Algorithm.stream_advantages), while its episode cost stays the end score.

The algorithm state is a tuple of per-constraint LagrangeStates; `multiplier` returns the vector
lambda [K]. From `jaxalign train`: config.stage = "multi_lag" with config.rl.constraints, e.g.
"severity3<=0.01,unsafe<=0.05" (parsed by stages/rl.py; each name a moderation signal read from the
moderation export at config.rl.cost_model_path, or "cost" = the cost model itself; see configs/base.py),
roles from rl/roles.py RolePaths.constraints; rl/iteration.py logs sum_i lambda_i as "lambda" and
before_update logs lambda/<name> and episode_cost/<name>.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.rl.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint: the mean episode cost of stream `name` <= threshold."""

    name: str  # the scorer role and advantage stream, e.g. "cost", "severity3", "unsafe"
    threshold: float
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    window_size: int = 128

    def __post_init__(self):
        if self.name == "reward" or not self.name:
            raise ValueError(f"a constraint needs a cost stream name other than 'reward', got {self.name!r}")
        if self.lambda_init <= 0 or self.window_size < 1:
            raise ValueError(f"constraint {self.name}: lambda_init must be > 0 and window_size >= 1")


def combined_advantages(reward_advantages: jax.Array, cost_advantages: jax.Array, lambdas: jax.Array) -> jax.Array:
    """(A_R - sum_i lambda_i A_Ci) / (1 + sum_i lambda_i): A_R [B,R], A_C [K,B,R], lambdas [K] -> [B,R]."""
    weighted = jnp.tensordot(lambdas.astype(jnp.float32), cost_advantages.astype(jnp.float32), axes=1)
    return (reward_advantages - weighted) / (1.0 + jnp.sum(lambdas))


def init_states(constraints) -> tuple[lagrange_lib.LagrangeState, ...]:
    """One LagrangeState (log lambda_i and the episode-cost window) per constraint."""
    return tuple(lagrange_lib.init_lagrange(c.lambda_init, c.window_size) for c in constraints)


def update_states(constraints, states, episode_costs, step, lambda_max: float | None, delay_steps: int = 0):
    """The lambda step of every constraint from its window mean episode_costs[i] (see the docstring)."""
    return tuple(
        lagrange_lib.update_lagrange(state, cost, step, threshold=c.threshold, lambda_lr=c.lambda_lr,
                                     lambda_max=lambda_max, delay_steps=delay_steps)
        for c, state, cost in zip(constraints, states, episode_costs))


def multipliers(states) -> jax.Array:
    """The vector lambda [K]."""
    return jnp.stack([lagrange_lib.lagrange_multiplier(state) for state in states])


@dataclasses.dataclass(frozen=True)
class MultiLagrangian(Algorithm):
    name: ClassVar[str] = "multi_lag"
    constraints: tuple[Constraint, ...] = ()

    def __post_init__(self):
        names = [c.name for c in self.constraints]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"multi_lag needs at least one constraint with distinct names, got {names}")

    @property
    def cost_streams(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.constraints)

    @property
    def scorers(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", *self.cost_streams)

    @property
    def streams(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", *self.cost_streams)

    @property
    def critics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", *self.cost_streams)

    def token_streams(self, settings) -> tuple[str, ...]:
        return self.cost_streams if settings.cost_per_token else ()

    def actor_advantages(self, settings, advantages, multiplier):
        costs = jnp.stack([advantages[name] for name in self.cost_streams])
        return combined_advantages(advantages["reward"], costs, multiplier)

    def init_state(self, settings):
        del settings
        return init_states(self.constraints)

    def observe(self, settings, state, local_scores: dict[str, np.ndarray]):
        del settings
        return tuple(lagrange_lib.push_costs(s, local_scores[c.name]) for c, s in zip(self.constraints, state))

    def before_update(self, settings, state, actor_step: int):
        costs = [lagrange_lib.cross_process_mean(lagrange_lib.window_mean(s)) for s in state]
        state = update_states(self.constraints, state, costs, actor_step, settings.lambda_max,
                              settings.lambda_update_delay_steps)
        metrics = {f"episode_cost/{c.name}": cost for c, cost in zip(self.constraints, costs)}
        metrics.update({f"lambda/{c.name}": float(lam) for c, lam in zip(self.constraints, multipliers(state))})
        return state, metrics

    def multiplier(self, settings, state):
        del settings
        return multipliers(state)
