"""Multi-constraint PPO-Lagrangian: one Lagrange multiplier per constraint.

Constraints i = 1..K, each a cost stream C_i with its own threshold d_i, window, initial lambda and
learning rate (e.g. P(severity 3) <= 1% and P(unsafe) <= 5% from one moderation model, or one per
harm category). Per constraint, exactly PPO-Lagrangian's rule (objectives/lagrange.py; Safe RLHF,
arXiv:2310.12773 eq. 31, with one multiplier per constraint of the constrained MDP, Altman 1999):

    J_i = mean of the last W_i episode costs of stream i (cross-process)
    log lambda_i <- log lambda_i + lr_i * (J_i - d_i) * lambda_i        (capped at lambda_max)

and the actor's advantage generalises (A_R - lambda A_C) / (1 + lambda) to

    A = (A_R - sum_i lambda_i A_Ci) / (1 + sum_i lambda_i)

so a constraint that holds lets its lambda_i decay towards 0 while a binding one grows. Every cost
stream is KL-shaped like the cost stream (+beta*KL) and has its own critic ("<name>_critic"); with
config.rl.multi_lag.cost_per_token every constraint's cost comes per token from the streaming
moderation head (base.Algorithm.stream_advantages), while its episode cost stays the end score.

The algorithm state is a tuple of per-constraint LagrangeStates; `multiplier` returns the vector
lambda [K]. From `jaxalign train`: config.stage = "multi_lag" with config.rl.multi_lag.constraints,
e.g. "severity3<=0.01,unsafe<=0.05" (parse_constraints; each name a moderation signal read from the
moderation export at config.rl.cost_model_path, or "cost" = the cost model itself), roles from
rl/roles.py RolePaths.constraints; rl/iteration.py logs sum_i lambda_i as "lambda" and
before_update logs lambda/<name> and episode_cost/<name>.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.rl import roles
from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.settings import AlgorithmSettings


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint: the mean episode cost of stream `name` <= threshold."""

    name: str  # the scorer role and advantage stream, e.g. "cost", "severity3", "unsafe", "category_3"
    threshold: float
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    window_size: int = 128
    signal: str = ""  # the moderation signal its scorer reads ("category:3"); "" = the "cost" role itself

    def __post_init__(self):
        if self.name == "reward" or not self.name:
            raise ValueError(f"a constraint needs a cost stream name other than 'reward', got {self.name!r}")
        if self.lambda_init <= 0 or self.window_size < 1:
            raise ValueError(f"constraint {self.name}: lambda_init must be > 0 and window_size >= 1")


@dataclasses.dataclass(frozen=True)
class MultiLagSettings(AlgorithmSettings):
    # One Lagrange multiplier per constraint, "name<=threshold" joined by commas, e.g.
    # "severity3<=0.01,unsafe<=0.05". name: a moderation signal (unsafe | expected_severity | severity3 |
    # category:<i>, which becomes the stream category_<i>), each read from the moderation export at
    # config.rl.cost_model_path with its own critic, or "cost" (the cost model with config.rl.cost_signal).
    # Per constraint, optional ";key=value" overrides of lambda_init, lambda_lr, window_size (defaults:
    # the fields below), e.g. "severity3<=0.01;lambda_lr=0.5,unsafe<=0.05;lambda_init=0.5".
    constraints: str = ""
    lambda_init: float = 1.0  # each constraint's default initial lambda
    lambda_lr: float = 0.1  # ... and learning rate
    episode_cost_window_size: int = 128  # ... and window of episode costs
    lambda_max: float = 5.0  # every lambda's cap; <= 0: no cap
    lambda_update_delay_steps: int = 0
    cost_per_token: bool = False  # every constraint's cost per token from the streaming head (as ppo_lag's)

    def check(self, where: str) -> None:
        super().check(where)
        if self.lambda_init <= 0 or self.episode_cost_window_size < 1:
            raise ValueError(f"{where}.lambda_init must be > 0 and {where}.episode_cost_window_size >= 1, got "
                             f"{self.lambda_init} and {self.episode_cost_window_size}")

    @property
    def lambda_cap(self) -> float | None:
        return self.lambda_max if self.lambda_max > 0 else None


CONSTRAINT_KEYS = ("lambda_init", "lambda_lr", "window_size")


def parse_constraints(settings: MultiLagSettings, where: str = "config.rl.multi_lag") -> tuple[Constraint, ...]:
    """settings.constraints ("severity3<=0.01;lambda_lr=0.5,unsafe<=0.05", see MultiLagSettings) ->
    the Constraints; ValueError naming `where`.constraints and the bad item."""
    field = f"{where}.constraints"
    spec = settings.constraints.strip()
    if not spec:
        raise ValueError(f"{field}: multi_lag needs at least one constraint, e.g. 'severity3<=0.01,unsafe<=0.05'")
    constraints = []
    for item in spec.split(","):
        head, *options = [part.strip() for part in item.split(";")]
        name, sep, threshold = head.partition("<=")
        name = name.strip()
        try:
            if not sep or not name:
                raise ValueError
            values = {"threshold": float(threshold), "lambda_init": settings.lambda_init,
                      "lambda_lr": settings.lambda_lr, "window_size": settings.episode_cost_window_size}
            for option in options:
                key, eq, value = (part.strip() for part in option.partition("="))
                if not eq or key not in CONSTRAINT_KEYS:
                    raise ValueError
                values[key] = int(value) if key == "window_size" else float(value)
        except ValueError:
            raise ValueError(f"{field}: bad constraint {item.strip()!r}; expected 'name<=threshold' with optional "
                             f"';key=value' for key in {', '.join(CONSTRAINT_KEYS)}") from None
        signal = ""
        if name != "cost":
            roles.check_signal(name, f"{field} ({item.strip()!r})")
            signal = name
        try:
            constraints.append(Constraint(name.replace(":", "_"), **values, signal=signal))
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    names = [c.name for c in constraints]
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: each constraint needs its own name, got {names}")
    return tuple(constraints)


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
    constraints: tuple[Constraint, ...] = ()  # build() parses them from settings.constraints
    settings: MultiLagSettings = MultiLagSettings()

    @classmethod
    def build(cls, settings: MultiLagSettings, has_cost_model: bool) -> "MultiLagrangian":
        if not has_cost_model:
            raise ValueError("multi_lag needs a cost model: set config.rl.cost_model_path (a moderation export)")
        return cls(constraints=parse_constraints(settings), settings=settings)

    def __post_init__(self):
        super().__post_init__()
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
    def moderation_signals(self) -> tuple[tuple[str, str], ...]:
        return tuple((c.name, c.signal) for c in self.constraints if c.signal)

    @property
    def streams(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", *self.cost_streams)

    @property
    def critics(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", *self.cost_streams)

    def token_streams(self, rl) -> tuple[str, ...]:
        return self.cost_streams if self.settings.cost_per_token else ()

    def actor_advantages(self, rl, advantages, multiplier):
        costs = jnp.stack([advantages[name] for name in self.cost_streams])
        return combined_advantages(advantages["reward"], costs, multiplier)

    def init_state(self, rl):
        return init_states(self.constraints)

    def observe(self, rl, state, local_scores: dict[str, np.ndarray]):
        return tuple(lagrange_lib.push_costs(s, local_scores[c.name]) for c, s in zip(self.constraints, state))

    def before_update(self, rl, state, actor_step: int):
        costs = [lagrange_lib.cross_process_mean(lagrange_lib.window_mean(s)) for s in state]
        state = update_states(self.constraints, state, costs, actor_step, self.settings.lambda_cap,
                              self.settings.lambda_update_delay_steps)
        metrics = {f"episode_cost/{c.name}": cost for c, cost in zip(self.constraints, costs)}
        metrics.update({f"lambda/{c.name}": float(lam) for c, lam in zip(self.constraints, multipliers(state))})
        return state, metrics

    def multiplier(self, rl, state):
        return multipliers(state)
