"""Attention, the one implementation every family calls: the block-causal self-attention of a
whole sequence (GQA without repeating K/V) with its own backward, and attention over a KV cache.

    out = causal_attention(q, k, v, mask, window=None, softcap=None)        # q [B, T, H, Dh] scaled
    out = cache_attention(q, k_cache, v_cache, mask, offset, window=None, softcap=None)

Both take the same options: `window` (sliding-window attention: a query sees the keys of the last
`window` slots, itself included, as transformers' sliding_window_overlay) and `softcap` (scores ->
softcap * tanh(scores / softcap) before masking, Gemma 2's attn_logit_softcapping). A window may be a
traced int32 scalar (one per layer in a scanned stack: a family whose layers alternate between
sliding and global attention passes each layer's); it is applied as a band on the slot indices, which
are the token positions of left-padded rows. A fused kernel (Pallas, cuDNN) slots in behind these
two functions with the same arguments: causal_attention's `impl` picks Pallas splash attention on
TPU or cuDNN's on NVIDIA GPUs (attention_kernels.py); cache_attention (decoding) is XLA everywhere.

`causal_attention` runs every product as a plain batched matmul [N, M, K] @ [N, K, J] over
N = B * KV (operands transposed once per call, not per block): on XLA:CPU a batched dot that
contracts the minor dim of both operands (q k^T) or the major dim of both (p^T dout) runs at a
third to a half of the speed of this form (probed in experiments/benchmark_llama.py's config).
The custom VJP keeps the forward's probabilities and computes the backward with the same layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxalign.models import attention_kernels

_NEG = -1e30  # finite "minus infinity": fully masked (padding) rows stay NaN-free


_CAUSAL_CHUNK = 128


def _blocks(t: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CAUSAL_CHUNK, t)) for start in range(0, t, _CAUSAL_CHUNK)]


def _mm(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[N, M, K] @ [N, K, J] -> [N, M, J]."""
    return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=dtype)


def _rows(x: jax.Array, kv: int) -> jax.Array:
    """[B, T, H, Dh] -> [B*KV, T*G, Dh]: per kv head, its G query heads' rows ordered (t, g)."""
    b, t, h, dh = x.shape
    return x.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 1, 3, 4).reshape(b * kv, t * (h // kv), dh)


def _unrows(x: jax.Array, b: int, t: int) -> jax.Array:
    """Inverse of _rows: [B*KV, T*G, Dh] -> [B, T, H, Dh]."""
    n, rows, dh = x.shape
    kv, g = n // b, rows // t
    return x.reshape(b, kv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, kv * g, dh)


def _heads(x: jax.Array, minor_t: bool) -> jax.Array:
    """[B, T, KV, Dh] -> [B*KV, T, Dh], or [B*KV, Dh, T] when minor_t."""
    b, t, kv, dh = x.shape
    if minor_t:
        return x.transpose(0, 2, 3, 1).reshape(b * kv, dh, t)
    return x.transpose(0, 2, 1, 3).reshape(b * kv, t, dh)


def _block_scores(qr, kt, start, end, g):
    """Raw scores [N, (end-start)*G, end] (fp32) of query rows start..end-1 against keys 0..end-1."""
    return _mm(qr[:, start * g : end * g], kt[:, :, :end])


def _cap(scores, softcap):
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _block_probs(qr, kt, mask, b, start, end, g, softcap):
    """Softmax probabilities [N, (end-start)*G, end] (fp32) of query rows start..end-1."""
    scores = _cap(_block_scores(qr, kt, start, end, g), softcap)
    scores = scores.reshape(b, -1, end - start, g, end)
    scores = jnp.where(mask[:, None, start:end, None, :end], scores, _NEG)
    return jax.nn.softmax(scores, axis=-1).reshape(scores.shape[0] * scores.shape[1], -1, end)


def _causal_forward(q, k, v, mask, softcap):
    b, t, h, _ = q.shape
    kv = k.shape[2]
    g = h // kv
    qr, kt, vh = _rows(q, kv), _heads(k, True), _heads(v, False)
    outs, probs = [], []
    for start, end in _blocks(t):
        p = _block_probs(qr, kt, mask, b, start, end, g, softcap).astype(q.dtype)
        outs.append(_mm(p, vh[:, :end]))
        probs.append(p)
    out = jnp.concatenate(outs, axis=1)  # [N, T*G, Dh] fp32
    return out, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal(q, k, v, mask, softcap):
    out, _ = _causal_forward(q, k, v, mask, softcap)
    return _unrows(out, q.shape[0], q.shape[1]).astype(q.dtype)


def _causal_fwd(q, k, v, mask, softcap):
    out, probs = _causal_forward(q, k, v, mask, softcap)
    b, t = q.shape[:2]
    return _unrows(out, b, t).astype(q.dtype), (q, k, v, mask, out, probs)


def _causal_bwd(softcap, res, dout):
    q, k, v, mask, out, probs = res
    b, t, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    do = _rows(dout, kv).astype(jnp.float32)  # [N, T*G, Dh]
    delta = jnp.sum(do * out, axis=-1, keepdims=True)  # rowsum(dP * P) = rowsum(dO * O)
    do_t = do.astype(q.dtype).transpose(0, 2, 1)  # [N, Dh, T*G]
    q_t = _rows(q, kv).transpose(0, 2, 1)  # [N, Dh, T*G]
    qr, kt = (_rows(q, kv), _heads(k, True)) if softcap is not None else (None, None)
    kh, vt = _heads(k, False), _heads(v, True)
    dqs = []
    dk_t = jnp.zeros((b * kv, dh, t), jnp.float32)
    dv_t = jnp.zeros((b * kv, dh, t), jnp.float32)
    for (start, end), p in zip(_blocks(t), probs):
        rows = slice(start * g, end * g)
        dp = _mm(do[:, rows].astype(q.dtype), vt[:, :, :end])  # [N, R, end]
        ds = p.astype(jnp.float32) * (dp - delta[:, rows])
        if softcap is not None:  # through the cap: d tanh(s / c) c / ds = 1 - tanh^2 (scores recomputed)
            ds = ds * (1.0 - jnp.square(jnp.tanh(_block_scores(qr, kt, start, end, g) / softcap)))
        ds = ds.reshape(b, kv, end - start, g, end)
        ds = jnp.where(mask[:, None, start:end, None, :end], ds, 0.0)
        ds = ds.reshape(b * kv, -1, end).astype(q.dtype)
        dqs.append(_mm(ds, kh[:, :end]))
        dk_t = dk_t.at[:, :, :end].add(_mm(q_t[:, :, rows], ds))
        dv_t = dv_t.at[:, :, :end].add(_mm(do_t[:, :, rows], p))
    dq = _unrows(jnp.concatenate(dqs, axis=1), b, t).astype(q.dtype)
    dk = dk_t.reshape(b, kv, dh, t).transpose(0, 3, 1, 2).astype(k.dtype)
    dv = dv_t.reshape(b, kv, dh, t).transpose(0, 3, 1, 2).astype(v.dtype)
    return dq, dk, dv, None


_causal.defvjp(_causal_fwd, _causal_bwd)


def _band(query_slots: jax.Array, key_slots: jax.Array, window) -> jax.Array:
    """[Tq, S] bool: key slot within the `window` slots ending at the query's (the query's own included)."""
    return key_slots[None, :] > query_slots[:, None] - window


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, window=None,
                     softcap: float | None = None, impl: str = "xla", windows: tuple = ()) -> jax.Array:
    """Self-attention of T new tokens whose mask [B, T, T] is causal & key padding (the decoder's
    tril & tokens[:, None, :]; a fused kernel reads the tokens [B, T] off its diagonal).
    q [B, T, H, Dh] (already scaled), k, v [B, T, KV, Dh] -> [B, T, H, Dh]. window / softcap: see
    the module docstring (None: off); windows: the static values a traced window takes.
    impl: "auto" | "xla" | "pallas" | "cudnn" (attention_kernels.resolve; a call cuDNN cannot
    express runs the XLA path: attention_kernels.cudnn_supports).

    XLA path: queries are processed in blocks of _CAUSAL_CHUNK rows, each against only the keys up
    to its last row: the blocks above the diagonal (all masked) are never computed. Exact (a full
    softmax per row); the backward (custom VJP) reuses the forward's probabilities.
    """
    impl = attention_kernels.resolve(impl)
    if impl == "pallas":
        return attention_kernels.splash(q, k, v, jnp.diagonal(mask, axis1=1, axis2=2), window=window,
                                        softcap=softcap, windows=windows)
    if impl == "cudnn" and attention_kernels.cudnn_supports(q, softcap):
        return attention_kernels.cudnn(q, k, v, jnp.diagonal(mask, axis1=1, axis2=2), window=window,
                                       windows=windows)
    if window is not None:
        slots = jnp.arange(q.shape[1])
        mask = mask & _band(slots, slots, window)[None]
    return _causal(q, k, v, mask, softcap)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, offset, *, window=None,
                    softcap: float | None = None) -> jax.Array:
    """Attention of T new queries over a layer's whole cache (the new tokens already written at
    slots offset .. offset+T-1). q [B, T, H, Dh] (scaled); k [B, KV, Dh, S], v [B, KV, S, Dh] (the
    kv_cache layout); mask [B, T, S] -> [B, T, H, Dh]. Both products are plain batched matmuls over
    (B, KV) on the cache as stored. window / softcap: as causal_attention."""
    b, t, h, dh = q.shape
    kv = k.shape[1]
    g = h // kv
    if window is not None:
        mask = mask & _band(offset + jnp.arange(t), jnp.arange(k.shape[-1]), window)[None]
    qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, dh)
    scores = jnp.matmul(qg, k.astype(q.dtype), preferred_element_type=jnp.float32)  # [B, KV, T*G, S]
    scores = _cap(scores, softcap).reshape(b, kv, t, g, -1)
    scores = jnp.where(mask[:, None, :, None, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, t * g, -1)
    out = jnp.matmul(probs, v.astype(q.dtype), preferred_element_type=jnp.float32)  # [B, KV, T*G, Dh]
    return out.reshape(b, kv, t, g, dh).transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh).astype(q.dtype)
