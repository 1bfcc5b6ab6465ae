"""Llama in Flax: logits parity with transformers, config handling, KV cache, params helpers."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import attention, decoder, hf, kv_cache, layouts, llama, masks

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Large init so activations, attention patterns and logits are O(1): a 1e-4 logits
    # tolerance is then a real check (at 0.02 every logit is ~1e-3 and attention is uniform).
    initializer_range=0.3,
)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, mask=None):
    return llama.Llama(cfg).apply({"params": params}, ids, attention_mask=mask)


@pytest.fixture(scope="module")
def tiny():
    """(cfg, params) of a random tiny Llama, shared: each init costs a multi-second compile."""
    cfg = llama.LlamaConfig(**TINY)
    return cfg, decoder.init_params(cfg, jax.random.PRNGKey(0))


def _hf_checkpoint(tmp_path, **overrides):
    """A random-init transformers LlamaForCausalLM saved to tmp_path; returns (model, dir)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    # Make norms non-trivial so a scale/transposition mix-up cannot hide behind ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "hf_model"
    model.save_pretrained(path)
    return model, path


def _hf_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        if mask is None:
            return model(torch.tensor(ids)).logits.numpy()
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        return model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


PARITY_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=16),  # != hidden_size / heads = 8
    "bias": dict(attention_bias=True, mlp_bias=True),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(tmp_path, case):
    model, path = _hf_checkpoint(tmp_path, **PARITY_CASES[case])
    cfg, params = hf.from_pretrained(path, dtype="float32")
    ids = np.random.RandomState(1).randint(0, TINY["vocab_size"], (2, 20))
    out = _forward(cfg, params, jnp.asarray(ids))
    assert out.logits.dtype == jnp.float32
    assert out.hidden_states.shape == (2, 20, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(out.logits), _hf_logits(model, ids), atol=1e-4, rtol=0)


def test_llama31_rope_scaling_beyond_original_context(tmp_path):
    rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    # head_dim 16: wavelengths 6.3 .. 2e3 cover the high (< 8), medium and low (> 32) branches.
    model, path = _hf_checkpoint(
        tmp_path, rope_scaling=rope, rope_theta=10000.0, head_dim=16, max_position_embeddings=256
    )
    cfg, params = hf.from_pretrained(path)
    assert cfg.rope_scaling.rope_type == "llama3"
    ids = np.random.RandomState(2).randint(0, TINY["vocab_size"], (1, 80))
    logits = _forward(cfg, params, jnp.asarray(ids)).logits
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, ids), atol=1e-4, rtol=0)
    # The scaling matters at these positions: without it the logits differ.
    unscaled = dataclasses.replace(cfg, rope_scaling=None)
    plain = _forward(unscaled, params, jnp.asarray(ids)).logits
    assert np.abs(np.asarray(plain) - np.asarray(logits))[:, 40:].max() > 1e-3


def test_left_padding_matches_transformers(tmp_path):
    model, path = _hf_checkpoint(tmp_path)
    cfg, params = hf.from_pretrained(path)
    rng = np.random.RandomState(3)
    ids = rng.randint(3, TINY["vocab_size"], (3, 16))
    mask = np.ones((3, 16), np.int64)
    mask[0, :5] = 0
    mask[1, :11] = 0
    ids = np.where(mask == 1, ids, 0)
    out = _forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    ref = _hf_logits(model, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(np.asarray(out.logits)).all()
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref[real], atol=1e-4, rtol=0)
    # Padding-invariance: a left-padded row equals the same tokens unpadded.
    alone = _forward(cfg, params, jnp.asarray(ids[1:2, 11:])).logits
    np.testing.assert_allclose(np.asarray(out.logits)[1, 11:], np.asarray(alone)[0], atol=1e-5)


def _param_shapes(cfg):
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(llama.Llama(cfg).init, jax.random.PRNGKey(0), ids)["params"]


def test_scan_and_unscanned_layers_agree(tiny):
    cfg, params = tiny
    unscanned_cfg = dataclasses.replace(cfg, scan_layers=False)
    unscanned = layouts.unstack_layers(params)
    restacked = layouts.stack_layers(unscanned)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restacked)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    expected = nn.meta.unbox(_param_shapes(unscanned_cfg))
    assert jax.tree_util.tree_structure(unscanned) == jax.tree_util.tree_structure(expected)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 12)))
    a = _forward(cfg, params, ids).logits
    b = _forward(unscanned_cfg, unscanned, ids).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_remat_gives_same_gradients(tiny):
    cfg, params = tiny
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 10)))

    def grads(c):
        loss = lambda p: jnp.mean(llama.Llama(c).apply({"params": p}, ids).logits ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain = grads(cfg)
    remat = grads(dataclasses.replace(cfg, remat_policy="full"))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_param_tree_and_logical_axes(tiny):
    cfg, params = tiny
    specs = nn.get_partition_spec(_param_shapes(cfg))
    assert set(specs) == {"model", "lm_head"}
    assert set(specs["model"]) == {"embed_tokens", "layers", "norm"}
    attn = specs["model"]["layers"]["self_attn"]
    assert tuple(attn["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(attn["k_proj"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(attn["o_proj"]["kernel"]) == ("layers", "heads", "head_dim", "embed")
    mlp = specs["model"]["layers"]["mlp"]
    assert tuple(mlp["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 2 * 2, 8)
    assert params["model"]["layers"]["input_layernorm"]["scale"].shape == (2, 32)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        nn.meta.unbox(_param_shapes(cfg))
    )
    tied = _param_shapes(dataclasses.replace(cfg, tie_word_embeddings=True))
    assert set(tied) == {"model"}


def test_kv_cache_decode_matches_full_forward(tiny):
    cfg, params = tiny
    model = llama.Llama(cfg)
    rng = np.random.RandomState(6)
    prompt = rng.randint(3, cfg.vocab_size, (2, 7))
    prompt_mask = np.ones((2, 7), bool)
    prompt_mask[1, :3] = False
    steps = rng.randint(3, cfg.vocab_size, (2, 5))
    full_ids = np.concatenate([prompt, steps], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, 5), bool)], axis=1)
    full = _forward(cfg, params, jnp.asarray(full_ids), jnp.asarray(full_mask)).logits

    apply = jax.jit(model.apply)
    cache = kv_cache.init_cache(cfg, 2, 12)
    out = apply({"params": params}, jnp.asarray(prompt), jnp.asarray(prompt_mask), None, cache)
    real = prompt_mask
    np.testing.assert_allclose(np.asarray(out.logits)[real], np.asarray(full)[:, :7][real], atol=1e-5)
    cache = out.cache
    for i in range(5):
        out = apply({"params": params}, jnp.asarray(steps[:, i : i + 1]), None, None, cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[:, 7 + i]), atol=1e-5)
        cache = out.cache
    assert int(cache.index) == 12
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 9])
    np.testing.assert_array_equal(np.asarray(cache.mask), full_mask)
    # scanned layers keep one stacked cache, carried through the scan and written in place
    assert cfg.scan_layers and cache.k.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_dim, 12)
    per_layer = kv_cache.init_cache(dataclasses.replace(cfg, scan_layers=False), 2, 12)
    with pytest.raises(ValueError, match="per layer but scan_layers=True"):
        apply({"params": params}, jnp.asarray(prompt), None, None, per_layer)
    _check_decode_layout(cfg, params, prompt, prompt_mask, steps, full)


def test_scanned_decode_step_writes_the_stacked_cache_in_place(tiny):
    """The scanned decode step carries the stacked cache through the layer scan and writes each
    layer's new column into it: compiled with the cache donated, its temporaries stay below half the
    cache (one layer's slice is read for attention). Scanning the cache as the layers' input and
    output instead stacked a new [L, ...] cache each step: temporaries above the whole cache."""
    cfg, _ = tiny
    cfg = dataclasses.replace(cfg, num_hidden_layers=8)
    model = llama.Llama(cfg)
    ids = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"])
    cache = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 2, 1024)).replace(empty=False)
    step = lambda p, i, c: model.apply({"params": p}, i, None, None, c, method=llama.Llama.last_token_logits)  # noqa: E731
    memory = jax.jit(step, donate_argnums=2).lower(params, ids, cache).compile().memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in (cache.k, cache.v))
    assert cache.k.shape[0] == 8 and memory.alias_size_in_bytes >= cache_bytes  # the cache is updated in its buffers
    assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


def _check_decode_layout(cfg, params, prompt, prompt_mask, steps, full):
    """The sampler's layout (layouts.decode_params: unrolled, fused q/k/v and gate/up) decodes
    like the full forward of the training layout, with a 2-token chunk after the prefill; and
    fuse_projections / unfuse_projections round-trip exactly."""
    round_trip = layouts.unfuse_projections(cfg, layouts.fuse_projections(cfg, params))
    assert jax.tree_util.tree_structure(round_trip) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(round_trip)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dcfg, dparams = layouts.decode_params(cfg, params)
    assert "qkv_proj" in dparams["model"]["layers_0"]["self_attn"] and "gate_up_proj" in dparams["model"]["layers_0"]["mlp"]
    apply = jax.jit(llama.Llama(dcfg).apply)
    out = apply({"params": dparams}, jnp.asarray(prompt), jnp.asarray(prompt_mask), None,
                kv_cache.init_cache(dcfg, 2, 12))
    np.testing.assert_allclose(np.asarray(out.logits)[prompt_mask], np.asarray(full)[:, :7][prompt_mask], atol=1e-5)
    out = apply({"params": dparams}, jnp.asarray(steps[:, :2]), None, None, out.cache)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, 7:9]), atol=1e-5)
    for i in range(2, 5):
        out = apply({"params": dparams}, jnp.asarray(steps[:, i : i + 1]), None, None, out.cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[:, 7 + i]), atol=1e-5)


def test_positions_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        np.asarray(masks.positions_from_mask(mask)), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    )


def test_resize_token_embeddings(tiny):
    cfg, params = tiny
    new_cfg, new_params = decoder.resize_token_embeddings(cfg, params, cfg.vocab_size + 3)
    assert new_cfg.vocab_size == cfg.vocab_size + 3
    emb, new_emb = params["model"]["embed_tokens"]["embedding"], new_params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(new_emb[: cfg.vocab_size]), np.asarray(emb))
    np.testing.assert_allclose(np.asarray(new_emb[-1]), np.asarray(emb.mean(0)), atol=1e-7)
    head = new_params["lm_head"]["kernel"]
    assert head.shape == (cfg.hidden_size, cfg.vocab_size + 3)
    np.testing.assert_allclose(np.asarray(head[:, -2]), np.asarray(params["lm_head"]["kernel"].mean(1)), atol=1e-7)
    assert params["model"]["embed_tokens"]["embedding"].shape[0] == cfg.vocab_size  # not mutated
    logits = _forward(new_cfg, new_params, jnp.asarray([[cfg.vocab_size + 2]])).logits
    assert logits.shape == (1, 1, cfg.vocab_size + 3)


def test_config_roundtrip_and_formats():
    cfg = llama.LlamaConfig(
        **TINY,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        eos_token_id=[5, 6],
    )
    assert cfg.eos_token_ids == (5, 6)
    assert llama.LlamaConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hash(cfg)  # usable as a static jit argument
    # transformers-5 layout: rope_theta inside rope_parameters.
    v5 = dict(TINY, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    parsed = llama.LlamaConfig.from_hf_config(v5, dtype="bfloat16", scan_layers=False)
    assert (parsed.rope_theta, parsed.rope_scaling, parsed.dtype, parsed.scan_layers) == (
        1234.0,
        None,
        "bfloat16",
        False,
    )
    legacy_linear = dict(TINY, rope_scaling={"type": "linear", "factor": 2.0})
    assert llama.LlamaConfig.from_hf_config(legacy_linear).rope_scaling.factor == 2.0


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_type", "yarn"]),
        (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
        (dict(attention_dropout=0.1), ["attention_dropout", "0.1"]),
        (dict(pretraining_tp=2), ["pretraining_tp", "2"]),
        (dict(vocab_size=None), ["missing", "vocab_size"]),
        (dict(num_key_value_heads=3), ["num_key_value_heads=3"]),
    ],
)
def test_config_rejects_unsupported(change, words):
    with pytest.raises(ValueError) as info:
        llama.LlamaConfig.from_hf_config({**TINY, **change})
    for word in words:
        assert word in str(info.value)
    with pytest.raises(TypeError, match="not_a_field"):
        llama.LlamaConfig.from_hf_config(TINY, not_a_field=1)


def test_bfloat16_compute_keeps_fp32_logits(tiny):
    cfg, params = tiny
    cfg = dataclasses.replace(cfg, dtype="bfloat16")  # params stay in param_dtype float32
    ids = jnp.asarray(np.random.RandomState(7).randint(0, cfg.vocab_size, (1, 9)))
    out = _forward(cfg, params, ids)
    assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
    ref = _forward(dataclasses.replace(cfg, dtype="float32"), params, ids).logits
    scale = float(np.abs(np.asarray(ref)).max())
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), atol=0.05 * scale)
    # The decode layout converts the fp32 params to bf16 once (norm scales stay fp32): same model.
    dcfg, dparams = layouts.decode_params(cfg, params)
    assert dparams["lm_head"]["kernel"].dtype == jnp.bfloat16 and dparams["model"]["norm"]["scale"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(_forward(dcfg, dparams, ids).logits), np.asarray(out.logits), atol=0.01 * scale)


def test_chunked_causal_attention_is_exact(tiny, monkeypatch):
    cfg, params = tiny
    rng = np.random.RandomState(8)
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 21)))
    mask = np.ones((2, 21), bool)
    mask[1, :6] = False
    mask = jnp.asarray(mask)
    apply = lambda p, i, m: llama.Llama(cfg).apply({"params": p}, i, attention_mask=m).logits  # noqa: E731
    whole = jax.jit(apply)(params, ids, mask)  # 21 <= chunk: one block
    monkeypatch.setattr(attention, "_CAUSAL_CHUNK", 8)  # blocks of 8, 8, 5 rows
    chunked = jax.jit(apply)(params, ids, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(chunked)[real], np.asarray(whole)[real], atol=1e-5, rtol=0)
