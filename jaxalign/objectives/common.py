"""Small numerical helpers shared by every objective (one place for each)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxalign.models.masks import last_true_index


def masked_row_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence masked mean: x, mask [B, T] -> [B]; an empty row gives 0."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence token mean, then batch mean (upstream semantics, safe-rlhf #154).

    x, mask: [B, T] -> scalar. Rows with an empty mask contribute 0.
    """
    return jnp.mean(masked_row_mean(x, mask))


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[..., token] in fp32.

    logits: [B, T, V], tokens: [B, T] -> [B, T]. Callers shift: pass logits[:, :-1]
    and tokens[:, 1:] to score each next token.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - log_z


def next_token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log softmax(logits[:, t])[input_ids[:, t + 1]] in fp32: each slot scores the next token.

    logits: [B, T, V], input_ids: [B, T] -> [B, T - 1]. Scores all T slots against the ids
    shifted left and drops the last slot, instead of slicing logits[:, :-1]: on XLA:CPU that
    slice copies the [B, T - 1, V] logits and its gradient pads them back (2.8% of the
    benchmark-config train step).
    """
    return token_log_probs(logits, jnp.roll(input_ids, -1, axis=1))[:, :-1]


def last_token_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Per-token scores [N, L] read at the last real token -> [N] fp32."""
    end = last_true_index(attention_mask)
    return jnp.take_along_axis(scores, end[:, None], axis=-1)[:, 0].astype(jnp.float32)
