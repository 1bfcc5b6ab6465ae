"""Mask helpers every model family, loss and rollout shares: positions of left-padded rows and the
index of each row's last real token."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions of left-padded rows: cumsum(mask) - 1, clipped at 0. [B, T] -> [B, T] int32."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_true_index(mask: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (0 when none). mask: [B, T] -> [B] int32."""
    length = mask.shape[-1]
    reversed_first = jnp.argmax(jnp.flip(mask.astype(bool), axis=-1), axis=-1)
    return (length - 1 - reversed_first).astype(jnp.int32)
