"""causal_attention (block-causal, custom VJP) against torch autograd on the same math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.models import attention


def _torch_attention(q, k, v, mask, softcap=None):
    """Dense reference: q [B, T, H, Dh], k, v [B, T, KV, Dh], mask [B, T, T] bool."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    if softcap is not None:  # transformers' eager_attention_forward (Gemma 2)
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask[:, None], -1e30)
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("chunk", [4, 64])  # several blocks (the last one short) / one block
def test_causal_attention_matches_torch_autograd(monkeypatch, chunk):
    monkeypatch.setattr(attention, "_CAUSAL_CHUNK", chunk)
    rng = np.random.RandomState(0)
    b, t, h, kv, dh = 2, 11, 4, 2, 8
    q, dout = (rng.randn(b, t, h, dh).astype(np.float32) for _ in range(2))
    k, v = (rng.randn(b, t, kv, dh).astype(np.float32) for _ in range(2))
    real = np.ones((b, t), bool)
    real[1, :3] = False  # left padding: rows 0-2 of sequence 1 see no key at all
    mask = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]

    def grads(dout):
        loss = lambda q, k, v: jnp.sum(attention.causal_attention(q, k, v, jnp.asarray(mask)) * dout)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def torch_grads(dout):
        tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
        ref = _torch_attention(tq, tk, tv, torch.tensor(mask))
        (ref * torch.tensor(dout, dtype=torch.float64)).sum().backward()
        return ref.detach().numpy(), (tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy())

    out = jax.jit(attention.causal_attention)(q, k, v, jnp.asarray(mask))
    ref, want = torch_grads(dout)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5)
    # A row that sees no key is uniform over the keys of its block (not of the whole row), so
    # its value gradient differs from the dense reference: compare dq, dk with a cotangent on
    # every row (no gradient may leak through masked scores) and dv without the padding rows'.
    got = grads(dout)
    for i in (0, 1):
        np.testing.assert_allclose(np.asarray(got[i]), want[i], atol=1e-4)
    dout = dout * real[:, :, None, None]
    got, (_, want) = grads(dout), torch_grads(dout)
    for i in (0, 1, 2):
        np.testing.assert_allclose(np.asarray(got[i]), want[i], atol=1e-4)


def test_sliding_window_and_softcap_match_torch_autograd(monkeypatch):
    """Gemma's options: a query sees the keys of the last `window` slots (transformers'
    sliding_window_overlay: kv > q - window), scores soft-capped before masking; gradients through
    both. The cache path (one query after the prefill, as in decoding) gives the same rows."""
    monkeypatch.setattr(attention, "_CAUSAL_CHUNK", 4)
    rng = np.random.RandomState(1)
    b, t, h, kv, dh, window, softcap = 2, 11, 4, 2, 8, 3, 2.0
    q, dout = (3 * rng.randn(b, t, h, dh).astype(np.float32) for _ in range(2))  # large scores: the cap binds
    k, v = (rng.randn(b, t, kv, dh).astype(np.float32) for _ in range(2))
    real = np.ones((b, t), bool)
    real[1, :2] = False
    mask = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
    slots = np.arange(t)
    band = mask & (slots[None, :] > slots[:, None] - window)[None]

    def loss(q, k, v):
        out = attention.causal_attention(q, k, v, jnp.asarray(mask), window=window, softcap=softcap)
        return jnp.sum(out * dout * real[:, :, None, None])

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    ref = _torch_attention(tq, tk, tv, torch.tensor(band), softcap)
    (ref * torch.tensor(dout * real[:, :, None, None], dtype=torch.float64)).sum().backward()
    out = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, jnp.asarray(mask), window=window,
                                                             softcap=softcap))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[real], ref.detach().numpy()[real], atol=1e-5)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for mine, want in zip(got, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(np.asarray(mine), want.numpy(), atol=1e-4)
    # The window and the cap matter here, and a traced window (a scanned layer's) gives the same.
    for other in (_torch_attention(tq, tk, tv, torch.tensor(mask), softcap), _torch_attention(tq, tk, tv, torch.tensor(band))):
        assert np.abs(other.detach().numpy() - ref.detach().numpy())[real].max() > 1e-2
    traced = jax.jit(lambda w: attention.causal_attention(q, k, v, jnp.asarray(mask), window=w, softcap=softcap))
    np.testing.assert_allclose(np.asarray(traced(jnp.int32(window))), np.asarray(out), atol=1e-6)
    # Decoding the last token over a cache of every slot (kv_cache layout: keys [B, KV, Dh, S]).
    k_cache, v_cache = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    last = attention.cache_attention(q[:, -1:], k_cache, v_cache, mask[:, -1:], t - 1, window=window, softcap=softcap)
    np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(out)[:, -1], atol=1e-5)
