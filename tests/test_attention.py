"""causal_attention (block-causal, custom VJP) against torch autograd on the same math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.models import attention


def _torch_attention(q, k, v, mask):
    """Dense reference: q [B, T, H, Dh], k, v [B, T, KV, Dh], mask [B, T, T] bool."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k).masked_fill(~mask[:, None], -1e30)
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
