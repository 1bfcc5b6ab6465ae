"""The fused attention kernels against the XLA path: Pallas splash attention in interpret mode on CPU
(forward and gradients; GQA, left / right padding, sliding window, softcap, a traced window), the
cuDNN call's padding rotation through jax's reference implementation, the kernel compiled for a
compile-only TPU v5e slice, and the choice of kernel (auto per platform, config override, errors)."""

import dataclasses
import importlib.util
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.models import attention, attention_kernels, gemma, llama, loading
from jaxalign.parallel import mesh as mesh_lib


def _inputs(b, t, h, kv, dh, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.randn(b, t, h, dh).astype(np.float32) * 0.3  # scaled queries
    k, v = (rng.randn(b, t, kv, dh).astype(np.float32) for _ in range(2))
    tokens = np.ones((b, t), bool)
    tokens[0, : t // 7] = False  # left padding
    tokens[1, t - t // 5:] = False  # right padding
    dout = rng.randn(b, t, h, dh).astype(np.float32) * tokens[:, :, None, None]  # padding rows are unread
    mask = np.tril(np.ones((t, t), bool))[None] & tokens[:, None, :]
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), tokens, jnp.asarray(mask), jnp.asarray(dout)


def _value_and_grads(attend, q, k, v, dout):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) * dout), argnums=(0, 1, 2)))(q, k, v)


def _assert_close(got, want, tokens, rtol):
    (loss, grads), (ref_loss, ref_grads) = got, want
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol)
    for g, r in zip(grads, ref_grads):
        scale = np.abs(np.asarray(r)).max()
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= rtol * scale, (np.abs(np.asarray(g) - np.asarray(r)).max(), scale)


@pytest.mark.parametrize("case", ["causal_gqa", "traced_window_softcap"])
def test_splash_matches_the_xla_path(case):
    """Interpret mode on CPU. T=300 is padded to 384 (three 128-blocks: blocks above the diagonal are
    skipped); the traced window is a scanned Gemma stack's (one kernel per window, lax.switch)."""
    if case == "causal_gqa":
        q, k, v, tokens, mask, dout = _inputs(2, 300, 4, 2, 64)
        kw, xla_kw = dict(), dict()
    else:
        q, k, v, tokens, mask, dout = _inputs(2, 200, 4, 1, 64, seed=1)
        window = jnp.int32(50)
        kw = dict(window=window, softcap=5.0, windows=(None, 50))
        xla_kw = dict(window=window, softcap=5.0)
    want = _value_and_grads(lambda q, k, v: attention.causal_attention(q, k, v, mask, **xla_kw), q, k, v, dout)
    got = _value_and_grads(lambda q, k, v: attention.causal_attention(q, k, v, mask, impl="pallas", **kw), q, k, v, dout)
    _assert_close(got, want, tokens, rtol=1e-4)
    out = attention.causal_attention(q, k, v, mask, impl="pallas", **kw)
    ref = attention.causal_attention(q, k, v, mask, **xla_kw)
    np.testing.assert_allclose(np.asarray(out)[tokens], np.asarray(ref)[tokens], atol=2e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_gemma_with_pallas_matches_xla_on_a_mesh():
    """Gemma 2 (sliding and global layers scanned: a traced window; logit softcap) with
    attention_impl="pallas" on a (data 2, fsdp 2, tensor 2) CPU mesh: the kernel runs per shard
    (shard_map), logits and parameter gradients equal the XLA path's."""
    from conftest import random_params

    cfg = gemma.Gemma2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=24)
    params = random_params(cfg)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(1, 64, (4, 40)))
    mask = np.ones((4, 40), bool)
    mask[0, :9] = mask[1, :3] = mask[2, 30:] = False  # left- and right-padded rows
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSettings(data=2, fsdp=2, tensor=2))

    def run(impl):
        module = models.causal_lm(dataclasses.replace(cfg, attention_impl=impl))

        def loss(params):
            logits = module.apply({"params": params}, ids, attention_mask=jnp.asarray(mask)).logits
            return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., 0]), logits

        with mesh_lib.sharding_context(mesh, mesh_lib.DEFAULT_AXIS_RULES):
            return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, logits), grads = run("pallas")
    (_, want_logits), want_grads = run("xla")
    np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(want_logits)[mask], atol=2e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4 * max(1.0, np.abs(np.asarray(w)).max()))


def test_cudnn_padding_rotation_matches_the_xla_path():
    """cuDNN takes padding as per-row lengths: each row is rotated to start at its first real token
    and back. jax's reference implementation of the same call runs on CPU."""
    q, k, v, tokens, mask, dout = _inputs(2, 40, 4, 2, 16)
    for window in (None, 7):
        want = _value_and_grads(lambda q, k, v: attention.causal_attention(q, k, v, mask, window=window), q, k, v, dout)
        got = _value_and_grads(lambda q, k, v: attention_kernels.cudnn(q, k, v, jnp.asarray(tokens), window=window,
                                                                        implementation="xla"), q, k, v, dout)
        _assert_close(got, want, tokens, rtol=1e-5)


def test_auto_picks_the_platform_kernel(monkeypatch):
    assert attention_kernels.resolve("auto") == "xla"  # CPU
    assert attention_kernels.resolve("pallas") == "pallas"  # forced: interpret mode off TPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_kernels.resolve("auto") == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention_kernels.resolve("auto") == "pallas"


def test_attention_impl_setting_and_errors():
    settings = loading.ModelSettings(hf_config=dict(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2),
                                     attention_impl="xla")
    assert loading.model_config(settings).attention_impl == "xla"
    assert loading.model_config(dataclasses.replace(settings, attention_impl="auto")).attention_impl == "auto"
    with pytest.raises(ValueError, match=r"^attention_impl='flash' is not one of auto, xla, pallas, cudnn$"):
        loading.model_config(dataclasses.replace(settings, attention_impl="flash"))
    from configs import base
    from jaxalign.stages import common

    assert common.model_settings(base.get_config()).attention_impl == "auto"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) is not installed")
def test_splash_compiles_for_tpu_v5e():
    """A train step's gradient with attention_impl "auto" compiled for a compile-only v5e:2x2 slice
    (fsdp 2 x tensor 2): splash's forward, dq and dkv kernels are in the TPU program (Llama; Gemma 2
    with its sliding window and softcap); with "xla" none is."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = jax.make_mesh((1, 2, 2), mesh_lib.MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = mesh_lib.DEFAULT_AXIS_RULES
    shape = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, dtype="bfloat16")

    def lowered(cfg):
        module = models.causal_lm(cfg)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        rows = mesh_lib.batch_sharding(mesh)
        ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
        mask = jax.ShapeDtypeStruct((4, 256), jnp.bool_, sharding=rows)
        with mesh_lib.sharding_context(mesh, rules):
            boxed = jax.eval_shape(loading.init_fn(module), key)
            params = jax.eval_shape(lambda r: nn.meta.unbox(loading.init_fn(module)(r)), key)
            params = mesh_lib.with_shardings(params, mesh_lib.logical_shardings(boxed, mesh, rules))
            loss = lambda p, ids, mask: jnp.mean(module.apply({"params": p}, ids, attention_mask=mask).logits)  # noqa: E731
            return jax.jit(jax.grad(loss)).lower(params, ids, mask)

    def kernels(text):
        return sorted(set(re.findall(r"splash_mha_(fwd|dq|dkv)_segmented", text)))

    for cfg in (llama.LlamaConfig(**shape), gemma.Gemma2Config(**shape, sliding_window=64)):
        assert cfg.attention_impl == "auto"
        assert kernels(lowered(cfg).compile().as_text()) == ["dkv", "dq", "fwd"], type(cfg).__name__
    assert kernels(lowered(llama.LlamaConfig(**shape, attention_impl="xla")).as_text()) == []
