"""Direct preference losses on pairs: DPO (spec §4.4), SafeDPO and C-DPO.

Every loss is a pure function of per-pair sequence log-probabilities; `pair_log_probs` computes
them from one policy (or reference) forward pass over concat([first; second]) (2B rows).

    DPO       loss_b = -logσ(β·[(ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref)])
              (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7; safe-rlhf algorithms/dpo, spec §4.4)
    SafeDPO   helpfulness pairs with safety indicators h (1 = unsafe). The safety-aware transform
              swaps a pair whose preferred answer is unsafe and the other safe; then
              loss_b = -logσ(β·[Δℓ_w - Δℓ_l] - (h_l - h_w)·Δ), Δ >= 0 the one extra hyper-parameter
              (Kim et al., SafeDPO, ICLR 2026, arXiv 2505.20065, §4; the closed form and the
              tractable objective are its Eqs. 9-12 per the ICLR reviews; numbering not re-checked
              against the PDF, which was not reachable from here)
    C-DPO     DPO under the Bradley-Terry preference p*_λ of r_λ = r - λc:
              p_λ = σ(r_λ(y_1) - r_λ(y_2)),  loss_b = -[p_λ·logσ(m) + (1 - p_λ)·logσ(-m)]
              with λ by dual ascent, λ <- λ + η·(J_C - threshold) (Liu, Sun & Zheng, "Enhancing LLM
              Safety via Constrained Direct Preference Optimization", arXiv 2403.02475, §4 and its
              dual-gradient algorithm; equation numbers not re-checked). Deviation: the paper
              estimates J_C = E_{y~π_θ}[c] from fresh samples of the policy; here J_C is estimated
              without sampling, as the cost of the answer the policy's implicit preference picks
              from each training pair (σ(m)·c_1 + σ(-m)·c_2), averaged over a window of batches.
              λ lives in log space and steps with PPO-Lagrangian's code (lagrange.py).

Window of the sequence log-probability ℓ (spec §4.4): the tokens from the first index d where
the two sequences differ up to each sequence's last real token, i.e. shifted slots
[d-1, end-1]. Upstream sums the shifted slots [d, end] instead (skips the first divergent
token and adds log p(pad)); the shared prefix cancels in ℓ^θ - ℓ^ref differences either way.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxalign.models.masks import last_true_index
from jaxalign.objectives import lagrange as lagrange_lib
from jaxalign.objectives.common import next_token_log_probs

# (params, input_ids [N,L], attention_mask [N,L]) -> logits [N,L,V]
PolicyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, input_ids [N,L], attention_mask [N,L]) -> end scores [N]
EndScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
VARIANTS = ("dpo", "safe_dpo", "c_dpo")


def divergence_index(ids_a: jax.Array, ids_b: jax.Array) -> jax.Array:
    """First index where two token sequences differ. ids_*: [B, L] -> [B] int (0 if identical)."""
    return jnp.argmax(ids_a != ids_b, axis=-1)


def sequence_log_probs(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                       start: jax.Array) -> jax.Array:
    """Σ_t log π(x_t | x_<t) over real tokens t >= start (start >= 1).

    logits: [N, L, V]; input_ids, attention_mask: [N, L]; start: [N] int. -> [N] fp32.
    """
    log_probs = next_token_log_probs(logits, input_ids)  # slot t scores token t+1
    tokens = jnp.arange(1, input_ids.shape[1])[None, :]
    window = (tokens >= start[:, None]) & attention_mask[:, 1:].astype(bool)
    return jnp.sum(jnp.where(window, log_probs, 0.0), axis=-1)


def pair_log_probs(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ℓ of both sides of pairs stacked as concat([first; second]).

    logits: [2B, L, V], input_ids, attention_mask: [2B, L] -> (ℓ_first [B], ℓ_second [B]); the
    window starts at the pair's first differing token (at least token 1).
    """
    first_ids, second_ids = jnp.split(input_ids, 2, axis=0)
    start = jnp.maximum(divergence_index(first_ids, second_ids), 1)
    ell = sequence_log_probs(logits, input_ids, attention_mask, jnp.concatenate([start, start]))
    return tuple(jnp.split(ell, 2, axis=0))


def implicit_rewards(policy_logp: jax.Array, reference_logp: jax.Array, beta: float) -> jax.Array:
    """β·(ℓ^θ - ℓ^ref). [B]."""
    return beta * (policy_logp - reference_logp)


def preference_metrics(better_reward: jax.Array, worse_reward: jax.Array) -> dict[str, jax.Array]:
    """reward_accuracy = mean(r_w > r_l), reward_margin = mean(r_w - r_l) and the two means
    of the implicit rewards (upstream's logged values). [B] each -> scalars."""
    return {
        "reward_accuracy": jnp.mean((better_reward > worse_reward).astype(jnp.float32)),
        "reward_margin": jnp.mean(better_reward - worse_reward),
        "better_reward": jnp.mean(better_reward),
        "worse_reward": jnp.mean(worse_reward),
    }


def dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array, ref_worse_logp: jax.Array,
             beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean_b -logσ(β·[(ℓ_w - ℓ_w^ref) - (ℓ_l - ℓ_l^ref)]) (spec §4.4). Inputs [B]. -> (loss, metrics)."""
    better_reward = implicit_rewards(better_logp, ref_better_logp, beta)
    worse_reward = implicit_rewards(worse_logp, ref_worse_logp, beta)
    loss = jnp.mean(-jax.nn.log_sigmoid(better_reward - worse_reward))
    return loss, preference_metrics(better_reward, worse_reward)


def safety_transform(better_unsafe: jax.Array, worse_unsafe: jax.Array) -> jax.Array:
    """SafeDPO's safety-aware transform: True where the helpfulness-preferred answer is unsafe and
    the other safe, i.e. where the pair is swapped. *_unsafe: [B] bool -> [B] bool."""
    return better_unsafe.astype(bool) & ~worse_unsafe.astype(bool)


def safe_dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array,
                  ref_worse_logp: jax.Array, better_unsafe: jax.Array, worse_unsafe: jax.Array, beta: float,
                  margin: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SafeDPO (arXiv 2505.20065, §4): swap the pairs whose preferred answer is unsafe and the other
    safe, then mean_b -logσ(β·[Δℓ_w - Δℓ_l] - (h_l - h_w)·Δ), h = 1 for unsafe, Δ = margin >= 0.

    Inputs [B] (log-probs and unsafe indicators, in helpfulness order). Metrics are on the
    transformed pairs, plus the swapped fraction. -> (loss, metrics).
    """
    swap = safety_transform(better_unsafe, worse_unsafe)
    r_better = implicit_rewards(better_logp, ref_better_logp, beta)
    r_worse = implicit_rewards(worse_logp, ref_worse_logp, beta)
    r_w, r_l = jnp.where(swap, r_worse, r_better), jnp.where(swap, r_better, r_worse)
    h_w = jnp.where(swap, worse_unsafe, better_unsafe).astype(jnp.float32)
    h_l = jnp.where(swap, better_unsafe, worse_unsafe).astype(jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(r_w - r_l - (h_l - h_w) * margin))
    metrics = preference_metrics(r_w, r_l)
    metrics["swapped_fraction"] = jnp.mean(swap.astype(jnp.float32))
    metrics["safe_over_unsafe_fraction"] = jnp.mean(h_l - h_w)
    return loss, metrics


def c_dpo_loss(better_logp: jax.Array, worse_logp: jax.Array, ref_better_logp: jax.Array, ref_worse_logp: jax.Array,
               better_score: jax.Array, worse_score: jax.Array, better_cost: jax.Array, worse_cost: jax.Array,
               lam: jax.Array, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """C-DPO (arXiv 2403.02475, §4) for a fixed λ: DPO with the soft label
    p_λ = σ(r_λ(y_1) - r_λ(y_2)), r_λ = r - λ·c, of the frozen reward and cost models.

    loss = mean_b -[p_λ·logσ(m) + (1 - p_λ)·logσ(-m)], m = β·[Δℓ_1 - Δℓ_2]. Inputs [B]
    (first = helpfulness-better side), lam []. Metrics: the DPO metrics in helpfulness order,
    label_mean = mean p_λ, and policy_cost = mean_b[σ(m)·c_1 + σ(-m)·c_2], the cost of the answer the
    policy's implicit preference picks from each pair (the estimate of J_C used by `c_dpo_step`).
    """
    r_1 = implicit_rewards(better_logp, ref_better_logp, beta)
    r_2 = implicit_rewards(worse_logp, ref_worse_logp, beta)
    margin = r_1 - r_2
    lam = jax.lax.stop_gradient(lam)
    label = jax.nn.sigmoid((better_score - lam * better_cost) - (worse_score - lam * worse_cost))
    label = jax.lax.stop_gradient(label)
    loss = jnp.mean(-(label * jax.nn.log_sigmoid(margin) + (1.0 - label) * jax.nn.log_sigmoid(-margin)))
    pick = jax.lax.stop_gradient(jax.nn.sigmoid(margin))
    metrics = preference_metrics(r_1, r_2)
    metrics["label_mean"] = jnp.mean(label)
    metrics["policy_cost"] = jnp.mean(pick * better_cost + (1.0 - pick) * worse_cost)
    return loss, metrics


def c_dpo_step(state: lagrange_lib.LagrangeState, policy_cost: jax.Array, threshold: float, lambda_lr: float,
               lambda_max: float | None) -> lagrange_lib.LagrangeState:
    """C-DPO's dual ascent on λ with PPO-Lagrangian's machinery (lagrange.py): push the batch's
    policy-cost estimate into the window, then one log-space step on -(J_C - threshold)·λ. Traced."""
    state = lagrange_lib.push_costs(state, jax.lax.stop_gradient(policy_cost)[None])
    return lagrange_lib.update_lagrange(state, lagrange_lib.window_mean(state), 0, threshold, lambda_lr,
                                        lambda_max, 0)


# ---------------------------------------------------------------------------------------
# The loss the training loop calls


def concat_sides(batch: dict, first: str, second: str) -> tuple[jax.Array, jax.Array]:
    """(input_ids [2B, L], attention_mask [2B, L]) of concat([first; second])."""
    ids = jnp.concatenate([batch[f"{first}_input_ids"], batch[f"{second}_input_ids"]], axis=0)
    mask = jnp.concatenate([batch[f"{first}_attention_mask"], batch[f"{second}_attention_mask"]], axis=0)
    return ids, mask


def end_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Per-token scores [N, L] read at the last real token -> [N] fp32."""
    end = last_true_index(attention_mask)
    return jnp.take_along_axis(scores, end[:, None], axis=-1)[:, 0].astype(jnp.float32)


def make_metrics_fn(policy: PolicyFn, variant: str, beta: float, margin: float = 0.0,
                    score_fns: dict[str, Callable] | None = None):
    """metrics_fn(params, batch, extra, frozen) -> (loss, metrics, extra) of one variant.

    dpo / c_dpo read "preference" batches (better/worse), safe_dpo "safety_preference" batches whose
    signs give the unsafe indicators (h = sign < 0). frozen: {"reference": params} (+ "reward",
    "cost" for c_dpo, applied with score_fns[role](params, ids, mask) -> per-token scores [N, L]);
    extra: {} or, for c_dpo, {"lagrange": LagrangeState} (λ used for the label; stepped by the caller).
    """
    if variant not in VARIANTS:
        raise ValueError(f"config.stage: unknown preference variant {variant!r}; valid: {', '.join(VARIANTS)}")
    first, second = ("safer", "unsafer") if variant == "safe_dpo" else ("better", "worse")

    def metrics_fn(params, batch, extra, frozen):
        ids, mask = concat_sides(batch, first, second)
        logp_1, logp_2 = pair_log_probs(policy(params, ids, mask), ids, mask)
        ref_logits = jax.lax.stop_gradient(policy(frozen["reference"], ids, mask))
        ref_1, ref_2 = pair_log_probs(ref_logits, ids, mask)
        if variant == "dpo":
            loss, metrics = dpo_loss(logp_1, logp_2, ref_1, ref_2, beta)
        elif variant == "safe_dpo":
            loss, metrics = safe_dpo_loss(logp_1, logp_2, ref_1, ref_2, batch[f"{first}_sign"] < 0,
                                          batch[f"{second}_sign"] < 0, beta, margin)
        else:
            reward = end_scores(score_fns["reward"](frozen["reward"], ids, mask), mask)
            cost = end_scores(score_fns["cost"](frozen["cost"], ids, mask), mask)
            r_1, r_2 = jnp.split(reward, 2)
            c_1, c_2 = jnp.split(cost, 2)
            lam = lagrange_lib.lagrange_multiplier(extra["lagrange"])
            loss, metrics = c_dpo_loss(logp_1, logp_2, ref_1, ref_2, r_1, r_2, c_1, c_2, lam, beta)
            metrics["lambda"] = lam
        return loss, metrics

    return metrics_fn


def make_loss_fn(policy: PolicyFn, variant: str, beta: float, margin: float = 0.0,
                 score_fns: dict[str, Callable] | None = None, threshold: float = 0.0, lambda_lr: float = 0.0,
                 lambda_max: float | None = None):
    """loss_fn(params, batch, rng, extra, frozen) -> (loss, (metrics, extra)) for `loop.train`.

    c_dpo: after each micro-batch, λ (extra["lagrange"]) takes one dual-ascent step towards
    J_C <= threshold (`c_dpo_step`); episode_cost is the window mean it used.
    """
    metrics_fn = make_metrics_fn(policy, variant, beta, margin, score_fns)

    def loss_fn(params, batch, rng, extra, frozen):
        del rng  # no dropout
        loss, metrics = metrics_fn(params, batch, extra, frozen)
        if variant == "c_dpo":
            lagrange = c_dpo_step(extra["lagrange"], metrics["policy_cost"], threshold, lambda_lr, lambda_max)
            extra = dict(extra, lagrange=lagrange)
            metrics["episode_cost"] = lagrange_lib.window_mean(lagrange)
        return loss, (metrics, extra)

    return loss_fn
