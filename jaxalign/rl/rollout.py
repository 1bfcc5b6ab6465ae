"""Experience of one rollout batch: log-probs, scores, values, shaped rewards and GAE (spec §5.2-5.5).

All functions are pure and traced inside one jit (`score_experience`); shapes use
B = batch, L = S + max_new_tokens, T = L - 1 (shifted slots), R = T - start (response slots).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxalign.objectives import ppo
from jaxalign.models.llama import last_true_index
from jaxalign.objectives.common import masked_row_mean, token_log_probs
from jaxalign.rl.roles import RoleFns
from jaxalign.rl.settings import RLSettings


@flax.struct.dataclass
class Experience:
    """Everything the PPO update needs from one rollout batch (response slots only)."""

    input_ids: jax.Array  # [B,L] int32: left-padded prompt + response + pad
    attention_mask: jax.Array  # [B,L] bool
    response_mask: jax.Array  # [B,R] bool: attention_mask[:, 1:][:, start:]
    old_log_probs: jax.Array  # [B,R]
    reward_values: jax.Array  # [B,R] reward-critic values at rollout time
    reward_advantages: jax.Array  # [B,R]
    reward_returns: jax.Array  # [B,R]
    cost_values: jax.Array  # [B,R] (zeros without a cost critic)
    cost_advantages: jax.Array  # [B,R]
    cost_returns: jax.Array  # [B,R]


def policy_log_probs(fns: RoleFns, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                     start: int) -> jax.Array:
    """log pi(token_{t+1} | tokens_<=t) for the response slots t >= start. -> [B,R]."""
    logits = fns.policy(params, input_ids, attention_mask)
    return token_log_probs(logits[:, start:-1], input_ids[:, start + 1:])


def end_scores(score_fn, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sequence score = per-token score at the last real token (EOS). -> [B]."""
    scores = score_fn(params, input_ids, attention_mask)
    end = last_true_index(attention_mask)
    return jnp.take_along_axis(scores, end[:, None], axis=-1)[:, 0].astype(jnp.float32)


def critic_values(score_fn, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                  start: int) -> jax.Array:
    """Critic values V_t = scores[:, t] for the response slots. -> [B,R]."""
    return score_fn(params, input_ids, attention_mask)[:, start:-1].astype(jnp.float32)


def score_experience(fns: RoleFns, settings: RLSettings, params: dict, kl_coeff: jax.Array,
                     input_ids: jax.Array, attention_mask: jax.Array) -> tuple[Experience, dict]:
    """Scores a rollout batch with every role and runs GAE on each stream.

    params: {"actor", "reference", "reward", "reward_critic"[, "cost", "cost_critic"]} pytrees;
    kl_coeff: [] (beta); input_ids, attention_mask: [B,L].
    Returns (Experience, per-batch stats {name: [B] or []}).
    """
    start = settings.start
    response_mask = attention_mask[:, 1:][:, start:]
    # Slot of the last real token within the response slots (spec §5.3 end_index - start).
    end_index = last_true_index(response_mask)

    old_log_probs = policy_log_probs(fns, params["actor"], input_ids, attention_mask, start)
    ref_log_probs = policy_log_probs(fns, params["reference"], input_ids, attention_mask, start)
    kl = old_log_probs - ref_log_probs
    reward = end_scores(fns.reward, params["reward"], input_ids, attention_mask)
    zeros = jnp.zeros_like(reward)
    cost = end_scores(fns.cost, params["cost"], input_ids, attention_mask) if settings.use_cost_model else zeros

    sequence_reward = reward
    if settings.algorithm == "ppo_reward_shaping":
        sequence_reward = reward - settings.lambda_init * cost  # R' = R - nu*C (spec §5.9)
    rewards = ppo.kl_shaped_rewards(sequence_reward, kl, end_index, kl_coeff, settings.clip_range_score)
    reward_values = critic_values(fns.reward_critic, params["reward_critic"], input_ids, attention_mask, start)
    reward_advantages, reward_returns = ppo.gae(rewards, reward_values, response_mask, 0,
                                                settings.gamma, settings.gae_lambda)

    if settings.use_cost_critic:
        costs = ppo.kl_shaped_costs(cost, kl, end_index, kl_coeff, settings.clip_range_score)
        cost_values = critic_values(fns.cost_critic, params["cost_critic"], input_ids, attention_mask, start)
        cost_advantages, cost_returns = ppo.gae(costs, cost_values, response_mask, 0,
                                                settings.gamma, settings.gae_lambda)
    else:
        costs = jnp.zeros_like(rewards)
        cost_values = cost_advantages = cost_returns = jnp.zeros_like(reward_values)

    mask = response_mask.astype(jnp.float32)
    stats = {
        "reward": reward,
        "cost": cost,
        "kl_divergence": jnp.sum(kl * mask, axis=-1),
        "reward_with_kl_penalty": jnp.sum(rewards * mask, axis=-1),
        "cost_with_kl_penalty": jnp.sum(costs * mask, axis=-1),
        "generated_length": jnp.sum(mask, axis=-1),
        "reward_value": masked_row_mean(reward_values, mask),
        "reward_advantage": masked_row_mean(reward_advantages, mask),
        "reward_return": masked_row_mean(reward_returns, mask),
        "cost_value": masked_row_mean(cost_values, mask),
        "cost_advantage": masked_row_mean(cost_advantages, mask),
        "cost_return": masked_row_mean(cost_returns, mask),
    }
    experience = Experience(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        old_log_probs=old_log_probs,
        reward_values=reward_values,
        reward_advantages=reward_advantages,
        reward_returns=reward_returns,
        cost_values=cost_values,
        cost_advantages=cost_advantages,
        cost_returns=cost_returns,
    )
    return experience, stats

