"""PPO (spec §5, upstream `ppo.sh`): the reward stream only, one critic; the cost model, when
given, is scored for logging."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxalign.rl.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class PPO(Algorithm):
    name: ClassVar[str] = "ppo"
    log_cost: bool = True  # score the cost model too (metrics only)

    @property
    def scorers(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward", "cost") if self.log_cost else ("reward",)
