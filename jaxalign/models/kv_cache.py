"""The decoding KV cache every family shares: one (k, v) buffer pair per layer, laid out for the
decode matmuls, plus the mask of real slots and each row's length.

    cache = kv_cache.init_cache(cfg, batch_size, max_length)   # models.init_cache(cfg, ...) is the same
    cache = kv_cache.grow_cache(cache, longer)                  # more empty slots, the filled ones kept
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from jaxalign.models.config import DecoderConfig


@flax.struct.dataclass
class KVCache:
    """Decoding cache, laid out for the decode matmuls (keys transposed): k: L x [B, KV, Dh, S];
    v: L x [B, KV, S, Dh], a tuple of per-layer buffers, or one [L, ...] array each when the
    layers are scanned (carried through the scan, each layer writing its new columns in place:
    LayerSlot); mask: [B, S] (slot holds a real token);
    index: int32 [] next slot to write (shared by the batch); lengths: [B] int32 real
    tokens seen per row (= the next position). `empty` (static) marks a fresh cache, so
    the prefill skips attending to its slots (none is valid)."""

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    mask: jax.Array
    index: jax.Array
    lengths: jax.Array
    empty: bool = flax.struct.field(pytree_node=False, default=False)


def init_cache(cfg: DecoderConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache with room for max_length tokens (prompt + generated) per row, stacked
    [L, ...] when cfg.scan_layers. Every layer keeps every slot (a sliding-window layer masks the
    old ones: its attention reads the same buffers)."""
    dtype = cfg.compute_dtype if dtype is None else dtype
    kv, dh, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    k, v = (batch_size, kv, dh, max_length), (batch_size, kv, max_length, dh)
    layers = (lambda shape: jnp.zeros((n, *shape), dtype)) if cfg.scan_layers else (
        lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(n)))
    return KVCache(
        k=layers(k),
        v=layers(v),
        mask=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        empty=True,
    )


def grow_cache(cache: KVCache, max_length: int) -> KVCache:
    """The same cache with room for max_length >= its current slots (empty slots appended).
    The sampler decodes in segments, each over a cache only as long as that segment fills, so
    a step's attention reads the slots filled so far rather than the whole final length."""
    extra = max_length - cache.mask.shape[1]
    if extra < 0:
        raise ValueError(f"grow_cache: the cache already has {cache.mask.shape[1]} slots > max_length {max_length}")
    if extra == 0:  # no copy of the cache (one segment: the scanned, sharded decode)
        return cache
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == x.ndim + axis else 0) for a in range(x.ndim)])  # noqa: E731
    return cache.replace(k=jax.tree.map(lambda k: pad(k, -1), cache.k), v=jax.tree.map(lambda v: pad(v, -2), cache.v),
                         mask=pad(cache.mask, -1))


@flax.struct.dataclass
class LayerSlot:
    """One layer's place in a stacked cache inside the layer scan (decoder.Backbone): the whole
    buffers k [L, B, KV, Dh, S], v [L, B, KV, S, Dh], carried through the scan, and layer (int32 []),
    the index of the layer running. The layer writes only its new columns into them (write_layer),
    so XLA updates the carried buffers in place instead of stacking a new [L, ...] cache per step."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array


def write_layer(cache_kv, k: jax.Array, v: jax.Array, index):
    """cache_kv: one layer's (k, v) buffers or a LayerSlot; this call's k, v [B, T, KV, Dh] written at
    slot `index` (of layer cache_kv.layer for a LayerSlot). Returns cache_kv updated, of the same kind."""
    k_cols, v_cols = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # [B, KV, Dh, T], [B, KV, T, Dh]
    if isinstance(cache_kv, LayerSlot):
        layer = cache_kv.layer
        return cache_kv.replace(
            k=jax.lax.dynamic_update_slice(cache_kv.k, k_cols[None].astype(cache_kv.k.dtype), (layer, 0, 0, 0, index)),
            v=jax.lax.dynamic_update_slice(cache_kv.v, v_cols[None].astype(cache_kv.v.dtype), (layer, 0, 0, index, 0)))
    k_cache, v_cache = cache_kv
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_cols.astype(k_cache.dtype), (0, 0, 0, index))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_cols.astype(v_cache.dtype), (0, 0, index, 0))
    return k_cache, v_cache


def layer_buffers(cache_kv) -> tuple[jax.Array, jax.Array]:
    """This layer's (k [B, KV, Dh, S], v [B, KV, S, Dh]) of cache_kv (one layer's buffers or a LayerSlot)."""
    if isinstance(cache_kv, LayerSlot):
        return tuple(jax.lax.dynamic_index_in_dim(x, cache_kv.layer, keepdims=False) for x in (cache_kv.k, cache_kv.v))
    return cache_kv
