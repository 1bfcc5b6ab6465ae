"""Static reward shaping (spec §5.9, upstream `ppo-reward-shaping.sh`): PPO on R' = R - nu*C with a
constant nu (config.rl.lambda_init) and one critic."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxalign.rl.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class RewardShaping(Algorithm):
    name: ClassVar[str] = "ppo_reward_shaping"
    scorers: ClassVar[tuple[str, ...]] = ("reward", "cost")

    def sequence_scores(self, settings, scores):
        return {"reward": scores["reward"] - settings.lambda_init * scores["cost"]}

    def multiplier(self, settings, state) -> jax.Array:
        return jnp.asarray(settings.lambda_init, jnp.float32)  # nu, logged as "lambda"
