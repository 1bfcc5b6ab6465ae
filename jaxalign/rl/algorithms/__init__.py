"""RL algorithms on one seam (see base.py): each module declares its roles, its settings (read from
config.rl.<name>), how a rollout is scored, its advantages, its actor loss and its per-iteration
hook; rl/steps.py runs any of them. Adding one: a module here + one entry in ALGORITHMS + a config.

    algorithm = algorithms.make("ppo_lag", has_cost_model=True)                # default settings
    algorithm = algorithms.make(name, True, algorithms.settings_from_group(name, config.rl))
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.algorithms.multi_lag import Constraint, MultiLagrangian
from jaxalign.rl.algorithms.ppo import PPO
from jaxalign.rl.algorithms.ppo_lag import PPOLagrangian
from jaxalign.rl.algorithms.reward_shaping import RewardShaping
from jaxalign.rl.algorithms.safe_grpo import SafeGRPO
from jaxalign.rl.algorithms.safe_grpo_k3 import SafeGRPOK3
from jaxalign.rl.algorithms.safe_gspo import SafeGSPO
from jaxalign.rl.settings import AlgorithmSettings

ALGORITHMS = {cls.name: cls for cls in (PPO, PPOLagrangian, RewardShaping, SafeGRPO, MultiLagrangian, SafeGSPO,
                                        SafeGRPOK3)}


def algorithm_class(name: str) -> type[Algorithm]:
    """The Algorithm subclass of config.stage `name`."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown RL algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def settings_class(name: str) -> type[AlgorithmSettings]:
    """The settings dataclass of algorithm `name` (its `settings` field's type)."""
    field = {f.name: f for f in dataclasses.fields(algorithm_class(name))}["settings"]
    return type(field.default)


def config_groups() -> dict[str, dict]:
    """{name: {field: default}} of every algorithm with settings of its own: the groups
    config.rl.<name> of configs/base.py."""
    groups = {name: settings_class(name).defaults() for name in ALGORITHMS}
    return {name: group for name, group in groups.items() if group}


def settings_from_group(name: str, rl: Mapping) -> AlgorithmSettings:
    """Algorithm `name`'s settings from the shared config group `rl` (its sub-group rl.<name>;
    an algorithm without settings of its own has none)."""
    cls = settings_class(name)
    if not dataclasses.fields(cls):
        return cls()
    if name not in rl:
        raise ValueError(f"config.rl.{name} is missing: configs/base.py builds it from {cls.__name__}")
    return cls.from_group(rl[name], f"config.rl.{name}")


def make(name: str, has_cost_model: bool, settings: AlgorithmSettings | None = None) -> Algorithm:
    """The algorithm of config.stage `name` with its settings (None: their defaults);
    has_cost_model: config.rl.cost_model_path is set."""
    cls, expected = algorithm_class(name), settings_class(name)
    if settings is None:
        settings = expected()
    if type(settings) is not expected:
        raise TypeError(f"{name} takes {expected.__name__}, got {type(settings).__name__}")
    return cls.build(settings, has_cost_model)


__all__ = ["Algorithm", "ALGORITHMS", "Constraint", "MultiLagrangian", "PPO", "PPOLagrangian", "RewardShaping",
           "SafeGRPO", "SafeGRPOK3", "SafeGSPO", "algorithm_class", "config_groups", "make", "settings_class",
           "settings_from_group"]
