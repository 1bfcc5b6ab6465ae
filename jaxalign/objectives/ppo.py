"""PPO pieces of Safe RLHF as pure functions (upstream safe-rlhf/safe_rlhf/algorithms/ppo/trainer.py,
safe_rlhf/algorithms/ppo_lag/trainer.py and safe_rlhf/trainers/rl_trainer.py).

Shapes: B = batch, T = L - 1 (the shifted sequence: slot t predicts token t + 1),
R = T - start (the response slots, start = padded prompt length - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.objectives.common import masked_mean

GAMMA = 1.0  # hard-coded upstream (rl_trainer.py get_advantages_and_returns)
GAE_LAMBDA = 0.95


def _add_end_scores(per_token: jax.Array, end_scores: jax.Array, end_index: jax.Array,
                    clip_range_score: float) -> jax.Array:
    """per_token [B,T] + end_scores [B] at end_index [B], clipped to +-clip_range_score."""
    at_end = jnp.arange(per_token.shape[-1])[None, :] == end_index[:, None]
    shaped = per_token + jnp.where(at_end, end_scores[:, None].astype(per_token.dtype), 0.0)
    return jnp.clip(shaped, -clip_range_score, clip_range_score)


def kl_shaped_rewards(end_scores: jax.Array, kl: jax.Array, end_index: jax.Array,
                      kl_coeff: float | jax.Array, clip_range_score: float) -> jax.Array:
    """Reward stream r_t = clip(-kl_coeff*kl_t + [t = end]*R, +-clip) (upstream
    ppo/trainer.py add_kl_divergence_regularization).

    end_scores [B], kl [B,T] (log pi_old - log pi_ref per token), end_index [B] -> [B,T].
    """
    return _add_end_scores(-kl_coeff * kl, end_scores, end_index, clip_range_score)


def kl_shaped_costs(end_scores: jax.Array, kl: jax.Array, end_index: jax.Array,
                    kl_coeff: float | jax.Array, clip_range_score: float) -> jax.Array:
    """Cost stream c_t = clip(+kl_coeff*kl_t + [t = end]*C, +-clip) (upstream
    ppo_lag/trainer.py add_kl_divergence_regularization, after safe-rlhf PR #173).

    end_scores [B], kl [B,T], end_index [B] -> [B,T].
    """
    return _add_end_scores(kl_coeff * kl, end_scores, end_index, clip_range_score)


def prefix_score_differences(prefix_scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token costs of a streaming scorer: c_t = s_t - s_t' (potential-based shaping, Ng et al. 1999).

    prefix_scores [B,R]: s_t, the scorer's score of the answer prefix ending with the token of
    slot t (a streaming moderation head: P(the finished answer is unsafe | prefix)); mask [B,R].
    At a real slot t', t' the previous real slot (s = 0 before the first); 0 at masked slots. The
    costs of a row sum to s at its last real slot, i.e. its end score, and the token whose prefix
    made the score jump carries the jump. -> [B,R] fp32.
    """
    mask = mask.astype(bool)
    slots = jnp.arange(mask.shape[-1])
    latest = jax.lax.cummax(jnp.where(mask, slots[None, :], -1), axis=1)  # latest real slot <= t, -1 before any
    potential = jnp.take_along_axis(prefix_scores.astype(jnp.float32), jnp.maximum(latest, 0), axis=1)
    potential = jnp.where(latest >= 0, potential, 0.0)
    previous = jnp.concatenate([jnp.zeros_like(potential[:, :1]), potential[:, :-1]], axis=1)
    return jnp.where(mask, potential - previous, 0.0)


def kl_shaped_token_costs(token_costs: jax.Array, kl: jax.Array, kl_coeff: float | jax.Array,
                          clip_range_score: float) -> jax.Array:
    """Cost stream c_t = clip(+kl_coeff*kl_t + cost_t, +-clip) with a cost at every token
    (prefix_score_differences) instead of one at the end. token_costs, kl [B,T] -> [B,T]."""
    return jnp.clip(kl_coeff * kl + token_costs, -clip_range_score, clip_range_score)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, start: int,
        gamma: float = GAMMA, lam: float = GAE_LAMBDA) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response slots (Schulman et al. 2016,
    arXiv:1506.02438; upstream rl_trainer.py get_advantages_and_returns).

    rewards, values, mask: [B,T]; start: static slot of the first response token.
    Returns (advantages [B,R], returns [B,R]) with R = T - start; advantages carry no gradient.
    Values and rewards are masked first, so slots after the end give delta = 0 and A = 0.
    """
    mask = mask.astype(values.dtype)
    rewards = (rewards * mask)[:, start:]
    values = (values * mask)[:, start:]
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, delta_t):
        advantage_t = delta_t + gamma * lam * carry
        return advantage_t, advantage_t

    # Scan over time (leading axis) from the last slot back to `start`.
    _, advantages = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = jax.lax.stop_gradient(advantages.T)
    return advantages, advantages + values


def combined_advantages(reward_advantages: jax.Array, cost_advantages: jax.Array,
                        lagrange_multiplier: jax.Array) -> jax.Array:
    """A = (A_R - lambda*A_C) / (1 + lambda) with no gradient through lambda (upstream
    ppo_lag/trainer.py rl_step: lambda is a Python float). [B,R]."""
    lam = jax.lax.stop_gradient(lagrange_multiplier)
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Masked (x - mean) / std over all valid tokens (off upstream; an option here). [B,R]."""
    mask = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / count
    var = jnp.sum(jnp.square(x - mean) * mask) / count
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def actor_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array,
               mask: jax.Array, clip_range_ratio: float) -> jax.Array:
    """PPO-clip loss -masked_mean(min(A*rho, A*clip(rho, 1-eps, 1+eps))) (Schulman et al. 2017,
    arXiv:1707.06347 eq. 7; upstream ppo/trainer.py actor_loss_fn).

    log_probs (trainable), old_log_probs, advantages, mask: [B,R] -> scalar.
    """
    ratio = jnp.exp(log_probs - old_log_probs)
    surrogate = advantages * ratio
    clipped = advantages * jnp.clip(ratio, 1.0 - clip_range_ratio, 1.0 + clip_range_ratio)
    return -masked_mean(jnp.minimum(surrogate, clipped), mask)


def critic_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                clip_range_value: float) -> jax.Array:
    """Clipped value loss 0.5*masked_mean(max((V-G)^2, (clip(V, V_old +- c)-G)^2)) (upstream
    rl_trainer.py critic_loss_fn).

    values (trainable), old_values, returns, mask: [B,R] -> scalar.
    """
    clipped_values = jnp.clip(values, old_values - clip_range_value, old_values + clip_range_value)
    loss = jnp.maximum(jnp.square(values - returns), jnp.square(clipped_values - returns))
    return 0.5 * masked_mean(loss, mask)


def adaptive_kl_coeff(kl_coeff: jax.Array, observed_kl: jax.Array, target_kl: float,
                      horizon: float, num_samples: int) -> jax.Array:
    """Ziegler et al. (2019) proportional KL controller (not upstream; off by default).

    beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon). Scalars.
    """
    error = jnp.clip(observed_kl / target_kl - 1.0, -0.2, 0.2)
    return kl_coeff * (1.0 + error * num_samples / horizon)
