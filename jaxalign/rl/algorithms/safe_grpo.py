"""Safe GRPO: critic-free PPO-Lagrangian with group-relative advantages (config.stage "safe_grpo").

k = config.rl.num_return_sequences responses are sampled per prompt (rl/iteration.py repeats each
prompt k times, so rows b*k .. b*k+k-1 form prompt b's group). Per stream (reward, cost):

    s_i   = sequence score with the KL term of PPO-Lagrangian (reward - β·KL, cost + β·KL; upstream
            safe-rlhf/safe_rlhf/algorithms/ppo_lag/trainer.py add_kl_divergence_regularization)
    A_i   = (s_i - mean_group(s)) / std_group(s)      (0 for a group whose scores are all equal)

broadcast over the response tokens: GRPO's outcome-supervision advantage (Shao et al. 2024,
DeepSeekMath, arXiv:2402.03300 §4.1.2). Reward and cost advantages are normalised SEPARATELY and
only then combined, A = (A_R - λ·A_C) / (1 + λ), exactly as PPO-Lagrangian combines its GAE
advantages: normalising the combined score r - λc instead rescales it per group and distorts the
effective λ (Constrained GRPO, arXiv:2602.05863). The actor loss is PPO's clipped surrogate per
token (base.Algorithm.actor_loss). λ, its cost window and its update are PPO-Lagrangian's
(ppo_lag.py; settings config.rl.safe_grpo). No critics: the RL state holds the actor only.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxalign.rl.algorithms.base import kl_shaping
from jaxalign.rl.algorithms.ppo_lag import LagrangeSettings, PPOLagrangian

STD_FLOOR = 1e-6  # a group whose scores spread less than this has advantage 0


def group_normalize(scores: jax.Array, group_size: int) -> jax.Array:
    """(s - group mean) / group std (population std) within consecutive groups of `group_size`.

    scores: [B] with B a multiple of group_size -> [B]. A group of equal scores gives exactly 0
    (never NaN); group_size 1 gives 0 everywhere.
    """
    groups = scores.reshape(-1, group_size).astype(jnp.float32)
    centered = groups - jnp.mean(groups, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(centered), axis=1, keepdims=True)
    spread = var > STD_FLOOR ** 2
    normalized = jnp.where(spread, centered * jax.lax.rsqrt(jnp.where(spread, var, 1.0)), 0.0)  # no sqrt(0)
    return normalized.reshape(scores.shape)


@dataclasses.dataclass(frozen=True)
class SafeGRPO(PPOLagrangian):
    name: ClassVar[str] = "safe_grpo"
    critics: ClassVar[tuple[str, ...]] = ()
    settings: LagrangeSettings = LagrangeSettings()

    def token_streams(self, rl) -> tuple[str, ...]:
        # A group-relative advantage is one number per answer: per-token costs would only sum back to the end score.
        return ()

    def stream_advantages(self, rl, stream, sequence_score, kl, end_index, kl_coeff, values, response_mask):
        del values  # critic-free
        if rl.num_return_sequences < 2:
            raise ValueError(f"{self.name} needs groups: set config.rl.num_return_sequences >= 2 (responses per prompt)")
        shaped = kl_shaping(stream)(sequence_score, kl, end_index, kl_coeff, rl.clip_range_score)
        total = jnp.sum(jnp.where(response_mask, shaped, 0.0), axis=-1)  # [B] sequence score with KL
        advantages = group_normalize(total, rl.num_return_sequences)
        return shaped, jnp.where(response_mask, advantages[:, None], 0.0), None
