"""Small numerical helpers shared by every objective (one place for each)."""

from __future__ import annotations

from typing import Callable

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


def chunked_token_log_probs(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], tokens: jax.Array,
                            chunk_size: int) -> jax.Array:
    """token_log_probs(head(hidden), tokens) without the [B, T, V] fp32 logits in memory.

    hidden: [B, T, D] (the final norm's output), head: h [B, C, D] -> logits [B, C, V] (the LM head,
    closing over its params), tokens: [B, T] -> [B, T] fp32. The positions run chunk_size at a time
    (a lax.map over T // chunk_size chunks, the remainder as one more); each chunk is rematerialised
    (jax.checkpoint), so the forward and the backward each hold one [B, chunk_size, V] block of logits
    instead of all T (Llama-3's 128k vocabulary: 0.5 GB fp32 per 1,000 positions of a row). Equal to
    the unchunked path up to fp32 reassociation in the head's matmul.
    """
    b, t, d = hidden.shape
    chunk = jax.checkpoint(lambda h, ids: token_log_probs(head(h), ids))
    full = (t // chunk_size) * chunk_size
    parts = []
    if full:
        n = full // chunk_size
        hs = hidden[:, :full].reshape(b, n, chunk_size, d).swapaxes(0, 1)  # [n, B, C, D]
        ids = tokens[:, :full].reshape(b, n, chunk_size).swapaxes(0, 1)
        parts.append(jax.lax.map(lambda x: chunk(*x), (hs, ids)).swapaxes(0, 1).reshape(b, full))
    if full < t:
        parts.append(chunk(hidden[:, full:], tokens[:, full:]))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def chunked_next_token_log_probs(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], input_ids: jax.Array,
                                 chunk_size: int) -> jax.Array:
    """next_token_log_probs(head(hidden), input_ids) computed chunk_size positions at a time
    (chunked_token_log_probs). hidden: [B, T, D], input_ids: [B, T] -> [B, T - 1]."""
    return chunked_token_log_probs(hidden, head, jnp.roll(input_ids, -1, axis=1), chunk_size)[:, :-1]


def last_token_scores(scores: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Per-token scores [N, L] read at the last real token -> [N] fp32."""
    end = last_true_index(attention_mask)
    return jnp.take_along_axis(scores, end[:, None], axis=-1)[:, 0].astype(jnp.float32)
