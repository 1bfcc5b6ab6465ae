"""PPO (Ouyang et al. 2022's RLHF recipe as upstream safe-rlhf/safe_rlhf/algorithms/ppo/trainer.py and
scripts/ppo.sh): the reward stream only, one critic; the cost model, when given, is scored for
logging. No settings of its own (config.rl holds them all)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxalign.rl.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class PPO(Algorithm):
    name: ClassVar[str] = "ppo"
    log_cost: bool = True  # score the cost model too (metrics only)

    @classmethod
    def build(cls, settings, has_cost_model: bool) -> "PPO":
        return cls(settings=settings, log_cost=has_cost_model)

    @property
    def scorers(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", "cost") if self.log_cost else ("reward",)
