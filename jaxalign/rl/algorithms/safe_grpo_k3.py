"""Safe GRPO with the KL in the loss (config.stage "safe_grpo_k3"), as GRPO was introduced.

DeepSeekMath's GRPO (Shao et al. 2024, arXiv:2402.03300) keeps the reward free of the KL and adds it
to the loss instead, per token, estimated against the reference with Schulman's unbiased, always
positive k3 estimator:

    J(θ) = 1/G Σ_i 1/|o_i| Σ_t { min(ρ_i,t Â_i,t, clip(ρ_i,t, 1 - ε, 1 + ε) Â_i,t) - β D_KL[π_θ || π_ref] }   (eq. 3)
    D_KL = π_ref(o_i,t|..) / π_θ(o_i,t|..) - log(π_ref(o_i,t|..) / π_θ(o_i,t|..)) - 1                    (eq. 4)

Here β is config.rl.kl_coeff, moved from the reward and cost streams into the loss: the group-relative
advantages of safe_grpo.py are computed from the raw reward and cost (not KL-shaped), combined with
PPO-Lagrangian's λ as (Â_R - λ Â_C) / (1 + λ). The reference's log-probs come from the rollout's
scoring (Experience.ref_log_probs). The KL term is the same for every λ: it is not part of the
constrained objective's trade-off. config.rl.adaptive_kl is not supported (β is a constant of the
compiled loss). Settings: config.rl.safe_grpo_k3 (the constraint and λ, as ppo_lag's).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxalign.objectives import ppo
from jaxalign.objectives.common import masked_mean
from jaxalign.rl.algorithms.ppo_lag import LagrangeSettings
from jaxalign.rl.algorithms.safe_grpo import SafeGRPO


def k3_kl(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """Schulman's k3 estimate of KL(π_θ || π_ref) per token, r - log r - 1 with r = π_ref / π_θ
    (DeepSeekMath eq. 4): >= 0, 0 where the two agree. [B,R] -> [B,R]."""
    log_ratio = ref_log_probs - log_probs.astype(jnp.float32)
    return jnp.exp(log_ratio) - log_ratio - 1.0


def grpo_kl_loss(log_probs: jax.Array, old_log_probs: jax.Array, ref_log_probs: jax.Array, advantages: jax.Array,
                 mask: jax.Array, clip_range_ratio: float, kl_coeff: float) -> jax.Array:
    """-J of DeepSeekMath eq. 3: the per-token PPO-clip loss plus β times the k3 KL, each averaged
    over an answer's tokens, then over the answers. All [B,R] -> []."""
    clip = ppo.actor_loss(log_probs, old_log_probs, advantages, mask, clip_range_ratio)
    return clip + kl_coeff * masked_mean(k3_kl(log_probs, ref_log_probs), mask)


@dataclasses.dataclass(frozen=True)
class SafeGRPOK3(SafeGRPO):
    name: ClassVar[str] = "safe_grpo_k3"
    settings: LagrangeSettings = LagrangeSettings()

    def stream_advantages(self, rl, stream, sequence_score, kl, end_index, kl_coeff, values, response_mask):
        if rl.adaptive_kl:
            raise ValueError(f"{self.name} has β = config.rl.kl_coeff in its loss: set config.rl.adaptive_kl=False")
        # the raw scores: the KL is in the loss
        return super().stream_advantages(rl, stream, sequence_score, kl, end_index, 0.0, values, response_mask)

    def actor_loss(self, rl, log_probs, exp, advantages):
        return grpo_kl_loss(log_probs, exp.old_log_probs, exp.ref_log_probs, advantages, exp.response_mask,
                            rl.clip_range_ratio, rl.kl_coeff)
