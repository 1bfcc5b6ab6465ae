"""Static reward shaping (the baseline Safe RLHF, Dai et al. 2023, arXiv:2310.12773, compares
PPO-Lagrangian with; upstream safe-rlhf/safe_rlhf/algorithms/ppo_reward_shaping/trainer.py): PPO on
R' = R - nu*C with a constant nu (config.rl.ppo_reward_shaping.nu) and one critic."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxalign.rl.algorithms.base import Algorithm
from jaxalign.rl.settings import AlgorithmSettings


@dataclasses.dataclass(frozen=True)
class RewardShapingSettings(AlgorithmSettings):
    nu: float = 1.0  # the constant cost weight (upstream --lambda_init; the paper sweeps 0.01 ... 100)

    def check(self, where: str) -> None:
        super().check(where)
        if not math.isfinite(self.nu) or self.nu < 0:
            raise ValueError(f"{where}.nu must be >= 0, got {self.nu}")


@dataclasses.dataclass(frozen=True)
class RewardShaping(Algorithm):
    name: ClassVar[str] = "ppo_reward_shaping"
    scorers: ClassVar[tuple[str, ...]] = ("reward", "cost")
    settings: RewardShapingSettings = RewardShapingSettings()

    def sequence_scores(self, rl, scores):
        return {"reward": scores["reward"] - self.settings.nu * scores["cost"]}

    def multiplier(self, rl, state) -> jax.Array:
        return jnp.asarray(self.settings.nu, jnp.float32)  # logged as "lambda"
