"""Safe GSPO: Safe GRPO with GSPO's sequence-level importance ratio (config.stage "safe_gspo").

GSPO (Zheng et al. 2025, Group Sequence Policy Optimization, arXiv:2507.18071) replaces the per-token
ratio of the PPO/GRPO loss by one ratio per answer, the length-normalised likelihood ratio

    s_i(θ) = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| Σ_t log π_θ(y_i,t|..)/π_old(y_i,t|..))   (eq. 7)

and clips it per answer, each answer weighing the same whatever its length:

    J(θ) = 1/G Σ_i min(s_i(θ) Â_i, clip(s_i(θ), 1 - ε_low, 1 + ε_high) Â_i)                            (eq. 5)

Â_i is Safe GRPO's advantage (safe_grpo.py): reward and cost, each KL-shaped and normalised within
the prompt's group (the group-relative Â of eq. 6 per stream), combined with λ as (Â_R - λ Â_C) / (1 + λ);
λ and its cost window are PPO-Lagrangian's. Its gradient is Â_i s_i times the mean of the answer's
token score functions (the paper's gradient analysis). On-policy (s_i = 1: the first minibatch and
epoch of a rollout) loss and gradient equal Safe GRPO's, whose PPO-clip loss also averages each
answer's tokens before the batch (upstream safe-rlhf #154). They differ off-policy, from the second
minibatch or PPO epoch of a rollout on (config.rl.num_minibatches, config.rl.ppo_epochs): one ratio
per answer, the geometric mean of its token ratios, so one clipped answer drops out entirely instead
of token by token, and the clip range is far narrower than PPO's (ε_low 3e-4, ε_high 4e-4 in the
paper's §5.1). Settings: config.rl.safe_gspo (the constraint and λ as ppo_lag's, plus clip_low / clip_high).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxalign.objectives.common import masked_row_mean
from jaxalign.rl.algorithms.ppo_lag import LagrangeSettings
from jaxalign.rl.algorithms.safe_grpo import SafeGRPO


@dataclasses.dataclass(frozen=True)
class SafeGSPOSettings(LagrangeSettings):
    clip_low: float = 3e-4  # ε_low: s_i is clipped to [1 - clip_low, 1 + clip_high] (GSPO §5.1: 3e-4, 4e-4)
    clip_high: float = 4e-4

    def check(self, where: str) -> None:
        super().check(where)
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"{where}.clip_low must be in (0, 1) and {where}.clip_high > 0, got {self.clip_low} "
                             f"and {self.clip_high}")


def gspo_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, mask: jax.Array,
              clip_low: float, clip_high: float) -> jax.Array:
    """-J of GSPO eq. 5 with the sequence ratio of eq. 7, the mean over the B answers.

    log_probs (trainable), old_log_probs, advantages, mask: [B,R]; an answer's advantage is the mean of
    its tokens' (one value per answer for a group-relative advantage); a row without a token adds 0,
    as in objectives/ppo.actor_loss. -> [].
    """
    ratio = jnp.exp(masked_row_mean(log_probs.astype(jnp.float32) - old_log_probs, mask))  # s_i [B]
    advantage = masked_row_mean(advantages.astype(jnp.float32), mask)  # Â_i [B]
    objective = jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantage)
    return -jnp.mean(objective)


@dataclasses.dataclass(frozen=True)
class SafeGSPO(SafeGRPO):
    name: ClassVar[str] = "safe_gspo"
    settings: SafeGSPOSettings = SafeGSPOSettings()

    def actor_loss(self, rl, log_probs, exp, advantages):
        return gspo_loss(log_probs, exp.old_log_probs, advantages, exp.response_mask, self.settings.clip_low,
                         self.settings.clip_high)
