"""Fused attention kernels behind attention.causal_attention, and the choice between them.

    impl = resolve("auto")        # "pallas" on TPU, "cudnn" on an NVIDIA GPU, "xla" elsewhere
    out = splash(q, k, v, tokens, window=None, softcap=None, windows=())   # TPU (Pallas)
    out = cudnn(q, k, v, tokens, window=None, windows=())                 # NVIDIA GPU (cuDNN)

Both compute the same attention as attention.causal_attention's XLA path: q [B, T, H, Dh] (already
scaled), k, v [B, T, KV, Dh] (GQA: H a multiple of KV), a causal mask restricted to the real tokens
`tokens` [B, T] bool (left and right padding alike), an optional sliding window (a query sees the
keys of the last `window` slots, its own included) and, for splash, the attention logit softcap.
Output rows of padding tokens are unspecified (finite); nothing reads them.

- splash: jax.experimental.pallas.ops.tpu.splash_attention (Pallas; the FlashAttention-2 algorithm,
  Dao 2023, arXiv:2307.08691, Alg. 1-2, with block sparsity: blocks above the diagonal or outside the
  window are skipped). Padding is expressed as segment ids (real tokens 1, padding 0: a real query
  sees only real keys), GQA natively (query head h reads kv head h // G), the softcap in-kernel
  (attn_logits_soft_cap). T is padded to a multiple of the block size with padding tokens. On a mesh
  the kernel runs per shard (shard_map over the batch and head axes of the logical rules in scope).
  Off TPU it runs in Pallas interpret mode (slow; for tests).
- cudnn: jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused flash attention. cuDNN
  expresses padding only as per-row lengths (real tokens first), so each row is rotated to start at
  its first real token and back: exact when a row's real tokens are contiguous (left-padded prompts,
  right-padded completions: every batch jaxalign builds). It has no logit softcap and needs bf16 /
  fp16 and head_dim <= 128 (a multiple of 8): attention.causal_attention uses XLA otherwise.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

IMPLS = ("auto", "xla", "pallas", "cudnn")
NO_WINDOW = 2**31 - 1  # a traced window's value for a global layer (decoder.NO_WINDOW)
_BLOCKS = (512, 256, 128)  # splash block sizes tried, largest first (the kernel's lanes are 128 wide)


def check_impl(impl: str, field: str = "attention_impl") -> None:
    """ValueError naming `field` unless impl is one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r} is not one of {', '.join(IMPLS)}")


def target_platform() -> str:
    """The platform the program being traced compiles for: the devices of the mesh in scope
    (jax.set_mesh; a compile-only TPU mesh included), else jax's default backend ("cpu", "tpu", "gpu")."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve(impl: str) -> str:
    """"auto" -> the platform's kernel ("pallas" on TPU, "cudnn" on GPU, "xla" elsewhere); other
    names as they are."""
    check_impl(impl)
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": "cudnn", "cuda": "cudnn"}.get(target_platform(), "xla")


def cudnn_supports(q: jax.Array, softcap) -> bool:
    """Whether cuDNN's fused attention expresses this call (else the XLA path runs)."""
    dh = q.shape[-1]
    return softcap is None and q.dtype in (jnp.bfloat16, jnp.float16) and dh <= 128 and dh % 8 == 0


def per_window(fn, window, windows: tuple, *args):
    """fn(static window, *args) for a window that is None, an int or a traced int32 scalar taking one
    of the static values `windows` (NO_WINDOW for None): then one fn per value, picked by lax.switch
    (a kernel's mask is static)."""
    if window is None or isinstance(window, int):
        return fn(window, *args)
    if not windows:
        raise ValueError("a traced window needs its possible values (windows=)")
    values = jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)
    branches = [functools.partial(fn, w) for w in windows]
    return jax.lax.switch(jnp.argmax(values == window), branches, *args)


# ----------------------------------------------------------------------------- splash (TPU)


def _block(t: int) -> int:
    return next(b for b in _BLOCKS if t % b == 0)


def _splash_kernel(t: int, heads: int, window: int | None, softcap: float | None, interpret: bool):
    """The splash kernel of a causal (or sliding-window) [t, t] mask for `heads` query heads (made per
    trace: its mask tables become constants of the trace that makes it)."""
    if window is None or window >= t:
        mask = splash_lib.CausalMask((t, t))
    else:  # keys window-1 slots back up to the query itself (LocalMask: q - left <= k <= q + right)
        mask = splash_lib.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    b = _block(t)
    sizes = splash_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                  block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash_lib.make_splash_mha(splash_lib.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                                      interpret=interpret)


def _splash_local(q, k, v, segments, window, softcap, interpret):
    """One shard: q [B, H, T, Dh], k, v [B, KV, T, Dh], segments [B, T] int32 -> [B, H, T, Dh]."""
    kernel = _splash_kernel(q.shape[2], q.shape[1], window, softcap, interpret)
    ids = splash_lib.SegmentIds(q=segments, kv=segments)
    return jax.vmap(kernel)(q, k, v, ids)


def _mesh_specs(b: int, h: int, kv: int):
    """(mesh, spec of [B, heads, T, Dh], spec of [B, T]) for shard_map from the logical rules in
    scope (batch and heads only; a mesh axis that does not divide its dim is dropped), or None
    without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim")) or (None,) * 4

    def fits(axes, n):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = 1
        for name in names:
            size *= mesh.shape[name]
        return axes if n % size == 0 else None

    batch = fits(batch, b)
    heads = fits(fits(heads, h), kv)
    return mesh, jax.P(batch, heads, None, None), jax.P(batch, None)


def splash(q, k, v, tokens, *, window=None, softcap: float | None = None, windows: tuple = ()):
    """Splash attention (module docstring). window: None, an int, or a traced int32 scalar
    (NO_WINDOW: global) whose possible values are `windows` (static; None for global): one kernel
    per value, the layer's picked by lax.switch."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    interpret = target_platform() != "tpu"
    padded = -(-t // 128) * 128
    qh, kh, vh = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0))) for x in (q, k, v))
    segments = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, padded - t)))

    def run(qh, kh, vh, segments):
        return per_window(lambda w, *a: _splash_local(*a, w, softcap, interpret), window, windows,
                          qh, kh, vh, segments)

    specs = _mesh_specs(b, h, kv)
    if specs is not None:
        mesh, heads_spec, tokens_spec = specs
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, tokens_spec),
                            out_specs=heads_spec, check_vma=False)
    out = run(qh, kh, vh, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- cuDNN (NVIDIA GPU)


def _rotate(x: jax.Array, shift: jax.Array) -> jax.Array:
    """Row b of x [B, T, ...] rotated left by shift[b] slots (slot s takes slot s + shift[b] mod T)."""
    t = x.shape[1]
    index = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def cudnn(q, k, v, tokens, *, window=None, windows: tuple = (), implementation: str = "cudnn"):
    """cuDNN flash attention (module docstring); window / windows: as splash. implementation="xla"
    runs jax's reference of the same call (the CPU test of the rotation)."""
    t = q.shape[1]
    first = jnp.argmax(tokens, axis=1).astype(jnp.int32)  # each row's first real slot (0: none)
    lengths = jnp.sum(tokens, axis=1, dtype=jnp.int32)

    def run(w, qr, kr, vr):
        return jax.nn.dot_product_attention(
            qr, kr, vr, scale=1.0, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if w is None or w >= t else (w - 1, 0), implementation=implementation)

    out = per_window(run, window, windows, *(_rotate(x, first) for x in (q, k, v)))
    return _rotate(out, (t - first) % t)
