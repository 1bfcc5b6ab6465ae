"""Reward- and cost-model losses on preference pairs: safe-rlhf's safe_rlhf/values/reward/trainer.py and
safe_rlhf/values/cost/trainer.py (Safe RLHF, Dai et al. 2023, arXiv:2310.12773, §3.2).

Every function is a pure function of arrays. Scores come from one forward pass of the
score model over `concat([better, worse])` (2B rows), split back into the two halves.
The token-wise losses replace upstream's per-sample Python loop with a window mask
t in [d, max(end_w, end_l)], d = first index where the two token sequences differ; the window
reaches into the shorter side's right-padding, which is scored at upstream's positions
(`upstream_positions`: arange(L) for right-padded rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import score
from jaxalign.models.masks import last_true_index, positions_from_mask
from jaxalign.objectives.common import masked_mean

LOSS_TYPES = ("sequence-wise", "token-wise")


def divergence_window(
    ids_a: jax.Array, ids_b: jax.Array, mask_a: jax.Array, mask_b: jax.Array
) -> jax.Array:
    """Window where a pair of responses is compared token by token.

    ids_*, mask_*: [B, T] -> bool [B, T], True for t in [d, max(end_a, end_b)] where d is
    the first index where ids_a != ids_b and end_* the last real token. Positions past the
    shorter sequence's end are included (as upstream's token-wise loss).
    """
    diverge = jnp.argmax(ids_a != ids_b, axis=-1)  # [B]
    end = jnp.maximum(last_true_index(mask_a), last_true_index(mask_b))  # [B]
    t = jnp.arange(ids_a.shape[-1])[None, :]
    return (t >= diverge[:, None]) & (t <= end[:, None])


def upstream_positions(mask: jax.Array) -> jax.Array:
    """Position ids as upstream's score models see them (upstream passes no position_ids, so HF uses
    arange(L)): the real tokens keep cumsum(mask) - 1 and right-padding continues counting past the last real token
    (a right-padded row gets exactly arange(L)), instead of repeating the last real position.
    Only the pad positions' scores change, which the token-wise losses read. mask [B, T] -> [B, T]."""
    t = jnp.arange(mask.shape[-1])[None, :]
    past_end = jnp.maximum(t - last_true_index(mask)[:, None], 0)
    return positions_from_mask(mask) + past_end


def _regularization(a: jax.Array, b: jax.Array) -> jax.Array:
    """mean(stack([a, b])²) for two equally shaped arrays."""
    return 0.5 * (jnp.mean(jnp.square(a)) + jnp.mean(jnp.square(b)))


def reward_sequence_loss(
    better_end: jax.Array, worse_end: jax.Array, regularization: float = 0.0
) -> jax.Array:
    """mean_b[-logσ(r_w - r_l)] + reg·mean(stack([r_l, r_w])²). better_end, worse_end: [B]."""
    loss = jnp.mean(-jax.nn.log_sigmoid(better_end - worse_end))
    return loss + regularization * _regularization(worse_end, better_end)


def reward_token_loss(
    better_scores: jax.Array,
    worse_scores: jax.Array,
    window: jax.Array,
    regularization: float = 0.0,
) -> jax.Array:
    """Token-wise reward loss. scores: [B, T] per-token scores; window: [B, T] from divergence_window.

    Per pair: mean over the window of -logσ(s_w - s_l) plus reg times the mean of
    s_w² and s_l² over the window; then the batch mean.
    """
    per_token = -jax.nn.log_sigmoid(better_scores - worse_scores)
    per_token += regularization * 0.5 * (jnp.square(better_scores) + jnp.square(worse_scores))
    return masked_mean(per_token, window)


def cost_sequence_loss(
    safer_end: jax.Array,
    unsafer_end: jax.Array,
    safer_sign: jax.Array,
    unsafer_sign: jax.Array,
    regularization: float = 0.0,
) -> jax.Array:
    """mean_b[-logσ(c_u - c_s) - logσ(k_s·c_s) - logσ(k_u·c_u)] + reg·mean(stack([c_s, c_u])²).

    *_end: [B] end costs; *_sign: [B] safety signs (+1 safe, -1 unsafe); k = -safety_sign.
    """
    k_safer = -safer_sign.astype(safer_end.dtype)
    k_unsafer = -unsafer_sign.astype(unsafer_end.dtype)
    loss = (
        -jax.nn.log_sigmoid(unsafer_end - safer_end)
        - jax.nn.log_sigmoid(k_safer * safer_end)
        - jax.nn.log_sigmoid(k_unsafer * unsafer_end)
    )
    return jnp.mean(loss) + regularization * _regularization(safer_end, unsafer_end)


def cost_token_loss(
    safer_scores: jax.Array,
    unsafer_scores: jax.Array,
    safer_sign: jax.Array,
    unsafer_sign: jax.Array,
    window: jax.Array,
    regularization: float = 0.0,
) -> jax.Array:
    """Token-wise cost loss. scores, window: [B, T]; signs: [B] (+1 safe, -1 unsafe).

    The three sequence-wise terms are each averaged over the window, plus reg times the
    window mean of c_s² and c_u²; then the batch mean.
    """
    k_safer = -safer_sign.astype(safer_scores.dtype)[:, None]
    k_unsafer = -unsafer_sign.astype(unsafer_scores.dtype)[:, None]
    per_token = (
        -jax.nn.log_sigmoid(unsafer_scores - safer_scores)
        - jax.nn.log_sigmoid(k_safer * safer_scores)
        - jax.nn.log_sigmoid(k_unsafer * unsafer_scores)
    )
    per_token += regularization * 0.5 * (jnp.square(safer_scores) + jnp.square(unsafer_scores))
    return masked_mean(per_token, window)


def reward_metrics(better_end: jax.Array, worse_end: jax.Array) -> dict[str, jax.Array]:
    """accuracy = mean(r_w > r_l); reward_mean/std over all 2B end scores (std unbiased)."""
    rewards = jnp.concatenate([better_end, worse_end])
    return {
        "accuracy": jnp.mean((better_end > worse_end).astype(jnp.float32)),
        "reward_mean": jnp.mean(rewards),
        "reward_std": jnp.std(rewards, ddof=1),
    }


def cost_metrics(
    safer_end: jax.Array, unsafer_end: jax.Array, safer_sign: jax.Array, unsafer_sign: jax.Array
) -> dict[str, jax.Array]:
    """accuracy = mean(c_u > c_s); accuracy_sign = mean over 2B of [cost·safety_sign < 0]."""
    costs = jnp.concatenate([safer_end, unsafer_end])
    signs = jnp.concatenate([safer_sign, unsafer_sign]).astype(costs.dtype)
    return {
        "accuracy": jnp.mean((unsafer_end > safer_end).astype(jnp.float32)),
        "accuracy_sign": jnp.mean((costs * signs < 0.0).astype(jnp.float32)),
        "cost_mean": jnp.mean(costs),
        "cost_std": jnp.std(costs, ddof=1),
    }


def reward_loss(
    scores: jax.Array,
    end_scores: jax.Array,
    batch: dict[str, jax.Array],
    loss_type: str = "sequence-wise",
    regularization: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reward-model loss and metrics from one forward pass over concat([better, worse]).

    scores: [2B, T] per-token scores, end_scores: [2B]; batch: a preference batch
    (better_/worse_ input_ids and attention_mask, [B, T]). -> (loss, metrics).
    """
    better_scores, worse_scores = jnp.split(scores, 2, axis=0)
    better_end, worse_end = jnp.split(end_scores, 2, axis=0)
    if loss_type == "sequence-wise":
        loss = reward_sequence_loss(better_end, worse_end, regularization)
    elif loss_type == "token-wise":
        window = divergence_window(
            batch["better_input_ids"],
            batch["worse_input_ids"],
            batch["better_attention_mask"],
            batch["worse_attention_mask"],
        )
        loss = reward_token_loss(better_scores, worse_scores, window, regularization)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    metrics = reward_metrics(better_end, worse_end)
    metrics["loss"] = loss
    return loss, metrics


def cost_loss(
    scores: jax.Array,
    end_scores: jax.Array,
    batch: dict[str, jax.Array],
    loss_type: str = "sequence-wise",
    regularization: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cost-model loss and metrics from one forward pass over concat([safer, unsafer]).

    scores: [2B, T], end_scores: [2B]; batch: a safety-preference batch (safer_/unsafer_
    input_ids and attention_mask [B, T], safer_sign/unsafer_sign [B]). -> (loss, metrics).
    """
    safer_scores, unsafer_scores = jnp.split(scores, 2, axis=0)
    safer_end, unsafer_end = jnp.split(end_scores, 2, axis=0)
    safer_sign, unsafer_sign = batch["safer_sign"], batch["unsafer_sign"]
    if loss_type == "sequence-wise":
        loss = cost_sequence_loss(safer_end, unsafer_end, safer_sign, unsafer_sign, regularization)
    elif loss_type == "token-wise":
        window = divergence_window(
            batch["safer_input_ids"],
            batch["unsafer_input_ids"],
            batch["safer_attention_mask"],
            batch["unsafer_attention_mask"],
        )
        loss = cost_token_loss(
            safer_scores, unsafer_scores, safer_sign, unsafer_sign, window, regularization
        )
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    metrics = cost_metrics(safer_end, unsafer_end, safer_sign, unsafer_sign)
    metrics["loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------
# Pairs in one forward pass, and the score stages' loss

# batch kind -> (first side, second side); the second should score higher for a cost model,
# lower for a reward model.
PAIR_SIDES = {"preference": ("better", "worse"), "safety_preference": ("safer", "unsafer")}
LOSSES = {"preference": reward_loss, "safety_preference": cost_loss}


def pair_sides(kind: str) -> tuple[str, str]:
    """("better", "worse") or ("safer", "unsafer")."""
    if kind not in PAIR_SIDES:
        raise ValueError(f"unknown pair kind {kind!r}; expected one of {tuple(PAIR_SIDES)}")
    return PAIR_SIDES[kind]


def concat_pair(batch: dict, kind: str):
    """Both sides of a pair batch stacked as one forward: -> (input_ids [2B, L], mask [2B, L])."""
    a, b = pair_sides(kind)
    concat = np.concatenate if isinstance(batch[f"{a}_input_ids"], np.ndarray) else jnp.concatenate
    ids = concat([batch[f"{a}_input_ids"], batch[f"{b}_input_ids"]], axis=0)
    mask = concat([batch[f"{a}_attention_mask"], batch[f"{b}_attention_mask"]], axis=0)
    return ids, mask


def make_score_loss_fn(module, head, kind: str, loss_type: str, regularization: float):
    """loss_fn(params, batch, rng, extra) -> (loss, (metrics, extra)) of a reward ("preference")
    or cost ("safety_preference") model for the training loop.

    module: a ScoreModel; head: its ScoreHead (normalizer type, momentum, do_normalize);
    extra = {"normalizer": stats}, updated from the 2B end scores of each micro-batch.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"config.score.loss_type: {loss_type!r} is not one of {LOSS_TYPES}")
    objective = LOSSES[kind]

    def loss_fn(params, batch, rng, extra):
        del rng  # no dropout
        ids, mask = concat_pair(batch, kind)
        out = module.apply({"params": params}, ids, attention_mask=mask, positions=upstream_positions(mask))
        stats = score.update_normalizer(
            extra["normalizer"], jax.lax.stop_gradient(out.end_scores), head.normalizer_type, head.momentum
        )
        token_scores, end_scores = out.scores, out.end_scores
        if head.do_normalize:
            token_scores = score.normalize(token_scores, stats, head.score_type)
            end_scores = score.normalize(end_scores, stats, head.score_type)
        loss, metrics = objective(token_scores[..., 0], end_scores[..., 0], batch, loss_type, regularization)
        metrics["normalizer_mean"] = stats["mean"][0]
        metrics["normalizer_var"] = stats["var"][0]
        return loss, (metrics, {"normalizer": stats})

    return loss_fn
