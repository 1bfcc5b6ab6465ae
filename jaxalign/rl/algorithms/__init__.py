"""RL algorithms on one seam (see base.py): each module declares its roles, how a rollout is
scored, its advantages and its per-iteration hook; rl/steps.py runs any of them.

    algorithm = algorithms.make("ppo_lag", has_cost_model=True)
"""

from __future__ import annotations

from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.algorithms.multi_lag import Constraint, MultiLagrangian
from jaxalign.rl.algorithms.ppo import PPO
from jaxalign.rl.algorithms.ppo_lag import PPOLagrangian
from jaxalign.rl.algorithms.reward_shaping import RewardShaping
from jaxalign.rl.algorithms.safe_grpo import SafeGRPO

ALGORITHMS = {cls.name: cls for cls in (PPO, PPOLagrangian, RewardShaping, SafeGRPO, MultiLagrangian)}


def make(name: str, has_cost_model: bool, constraints: tuple[Constraint, ...] = ()) -> Algorithm:
    """The algorithm of config.stage `name`; has_cost_model: config.rl.cost_model_path is set;
    constraints: multi_lag's (stages/rl.py parses them from config.rl.constraints)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown RL algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    if name == "ppo":
        return PPO(log_cost=has_cost_model)
    if name == "multi_lag":
        if not has_cost_model:
            raise ValueError("multi_lag needs a cost model: set config.rl.cost_model_path (a moderation export)")
        return MultiLagrangian(constraints=tuple(constraints))
    algorithm = ALGORITHMS[name]()
    if "cost" in algorithm.scorers and not has_cost_model:
        raise ValueError(f"{name} needs a cost model: set config.rl.cost_model_path")
    return algorithm


__all__ = ["Algorithm", "ALGORITHMS", "Constraint", "MultiLagrangian", "PPO", "PPOLagrangian", "RewardShaping",
           "SafeGRPO", "make"]
