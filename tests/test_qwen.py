"""Qwen2 / Qwen3 through the family seam: logits parity with transformers, HF round trips,
KV-cache decoding, greedy sampling, score models and the model_type registry."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from jaxalign import models
from jaxalign.models import decoder, families, hf, layouts, llama, qwen, score

TINY = dict(
    vocab_size=89,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=128,
    # O(1) activations and logits, so a 1e-4 tolerance is a real check (see test_llama.py).
    initializer_range=0.3,
)
PAD = 0
_padded = functools.partial(conftest.left_padded, vocab_size=TINY["vocab_size"], pad=PAD)
CONFIGS = {"qwen2": qwen.Qwen2Config, "qwen3": qwen.Qwen3Config}


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, mask=None):
    return models.causal_lm(cfg).apply({"params": params}, ids, attention_mask=mask)


def _hf_model(model_type, **overrides):
    """A random-init transformers Qwen2ForCausalLM / Qwen3ForCausalLM with non-trivial norms
    and biases."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    model_class = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[model_type]
    config = config_class(**{**TINY, "pad_token_id": PAD, **overrides})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


PARITY_CASES = {
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=16)),  # != hidden_size / heads = 8
    "qwen3_tied_bias": ("qwen3", dict(head_dim=8, tie_word_embeddings=True, attention_bias=True)),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers_with_left_padding(tmp_path, case):
    model_type, overrides = PARITY_CASES[case]
    model = _hf_model(model_type, **overrides)
    model.save_pretrained(tmp_path)
    cfg, params = hf.from_pretrained(tmp_path, dtype="float32")
    assert type(cfg) is CONFIGS[model_type] and cfg.model_type == model_type
    assert cfg.tie_word_embeddings == bool(overrides.get("tie_word_embeddings")) and cfg.num_key_value_heads == 2
    ids, mask = _padded([14, 9, 3], 14, seed=1)
    out = _forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.shape == (3, 14, TINY["vocab_size"]) and out.logits.dtype == jnp.float32
    ref = conftest.hf_logits(model, ids, mask)
    np.testing.assert_allclose(np.asarray(out.logits)[mask], ref[mask], atol=1e-4, rtol=0)
    # A left-padded row equals the same tokens unpadded; llama.Llama is the same module.
    alone = llama.Llama(cfg).apply({"params": params}, jnp.asarray(ids[1:2, 5:])).logits
    np.testing.assert_allclose(np.asarray(out.logits)[1, 5:], np.asarray(alone)[0], atol=1e-5)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request):
    """(cfg, params) of a jaxalign-side tiny Qwen2 (head_dim 16 != hidden / heads, which
    transformers must read from config.json) / Qwen3 (with attention_bias)."""
    extra = dict(attention_bias=True) if request.param == "qwen3" else dict(head_dim=16)
    cfg = CONFIGS[request.param](**TINY, eos_token_id=[2, 3], pad_token_id=PAD, **extra)
    return cfg, conftest.random_params(cfg)


def test_save_pretrained_loads_in_transformers_and_back(tiny, tmp_path):
    pytest.importorskip("transformers")
    cfg, params = tiny
    logits = lambda c, p, ids, mask: _forward(c, p, jnp.asarray(ids), jnp.asarray(mask)).logits  # noqa: E731
    _, config, cfg2 = conftest.transformers_round_trip(tmp_path, cfg, params, logits)
    assert config["use_sliding_window"] is False
    assert dataclasses.replace(cfg2, max_position_embeddings=cfg.max_position_embeddings) == cfg
    # The per-layer (unscanned) layout maps the same tensors (q_norm / biases included).
    ids, mask = _padded([11, 6], 11, seed=2)
    cfg_u, params_u = hf.from_pretrained(tmp_path, scan_layers=False)
    assert "layers_1" in params_u["model"]
    unscanned = np.asarray(_forward(cfg_u, params_u, jnp.asarray(ids), jnp.asarray(mask)).logits)
    np.testing.assert_allclose(unscanned[mask], np.asarray(logits(cfg, params, ids, mask))[mask], atol=2e-5)


def test_param_tree_and_tensor_map(tiny):
    cfg, params = tiny
    attn = params["model"]["layers"]["self_attn"]
    dh = cfg.head_dim
    assert attn["q_proj"]["bias"].shape == (2, 4, dh) and attn["v_proj"]["bias"].shape == (2, 2, dh)
    assert ("bias" in attn["o_proj"]) == (cfg.model_type == "qwen3")  # Qwen2: never an o_proj bias
    assert ("q_norm" in attn) == (cfg.model_type == "qwen3")
    shapes = jax.eval_shape(models.causal_lm(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    specs = nn.get_partition_spec(shapes)["params"]["model"]["layers"]["self_attn"]
    assert tuple(specs["q_proj"]["bias"]) == ("layers", "heads", "head_dim")
    if cfg.attention_options.qk_norm:
        assert tuple(specs["k_norm"]["scale"]) == ("layers", "head_dim")
    tensors = hf.params_to_hf_tensors(cfg, params)
    assert set(tensors) == set(hf.lm_hf_shapes(cfg))
    assert ("model.layers.1.self_attn.o_proj.bias" in tensors) == (cfg.model_type == "qwen3")
    assert ("model.layers.0.self_attn.k_norm.weight" in tensors) == (cfg.model_type == "qwen3")
    back = hf.params_from_hf_tensors(cfg, tensors)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A Qwen3 checkpoint without its q/k norms is refused, naming the tensors.
    if cfg.attention_options.qk_norm:
        missing = {k: v for k, v in tensors.items() if "q_norm" not in k}
        with pytest.raises(hf.CheckpointError, match=r"missing tensors: \['model.layers.0.self_attn.q_norm.weight'"):
            hf.params_from_hf_tensors(cfg, missing)


def test_remat_and_unscanned_layers_give_same_gradients():
    cfg = qwen.Qwen3Config(**TINY, attention_bias=True)  # q/k norms and biases inside nn.scan / remat
    params = conftest.random_params(cfg, seed=2)
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 10)))

    def grads(c, p):
        loss = lambda p: jnp.mean(models.causal_lm(c).apply({"params": p}, ids).logits ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(p)

    plain = grads(cfg, params)
    remat = grads(dataclasses.replace(cfg, remat_policy="full"), params)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    unscanned = grads(dataclasses.replace(cfg, scan_layers=False), layouts.unstack_layers(params))
    restacked = layouts.stack_layers(unscanned)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(restacked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_kv_cache_decode_matches_full_forward(tiny):
    cfg, params = tiny
    model = models.causal_lm(cfg)
    rng = np.random.RandomState(6)
    prompt, prompt_mask = _padded([7, 4], 7, seed=6)
    steps = rng.randint(3, cfg.vocab_size, (2, 5))
    full_ids = np.concatenate([prompt, steps], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, 5), bool)], axis=1)
    full = _forward(cfg, params, jnp.asarray(full_ids), jnp.asarray(full_mask)).logits

    apply = jax.jit(model.apply)
    cache = models.init_cache(cfg, 2, 12)
    out = apply({"params": params}, jnp.asarray(prompt), jnp.asarray(prompt_mask), None, cache)
    np.testing.assert_allclose(np.asarray(out.logits)[prompt_mask], np.asarray(full)[:, :7][prompt_mask], atol=1e-5)
    cache = out.cache
    for i in range(5):
        out = apply({"params": params}, jnp.asarray(steps[:, i : i + 1]), None, None, cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[:, 7 + i]), atol=1e-5)
        cache = out.cache
    np.testing.assert_array_equal(np.asarray(cache.lengths), [12, 9])
    # The sampler's decode layout (fused q/k/v with Qwen2's biases / Qwen3's q/k norms, unrolled).
    dcfg, dparams = layouts.decode_params(cfg, params)
    apply = jax.jit(models.causal_lm(dcfg).apply)
    out = apply({"params": dparams}, jnp.asarray(prompt), jnp.asarray(prompt_mask), None, models.init_cache(dcfg, 2, 12))
    for i in range(5):
        out = apply({"params": dparams}, jnp.asarray(steps[:, i : i + 1]), None, None, out.cache)
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), np.asarray(full[:, 7 + i]), atol=1e-5)


def test_greedy_sampling_matches_transformers_generate():
    ids, mask = _padded([8, 3, 6], 8, seed=3)
    conftest.greedy_matches_transformers(_hf_model("qwen3", head_dim=8), ids, mask, n=8, pad=PAD)


def test_score_model_on_qwen_backbone_saves_and_reloads(tmp_path):
    cfg = qwen.Qwen2Config(**TINY, scan_layers=False)
    model = score.ScoreModel(cfg, score_dim=2)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), nn.meta.unbox(shapes["params"]))
    assert "bias" in params["model"]["layers_0"]["self_attn"]["q_proj"]  # the Qwen2 backbone
    head = score.ScoreHead(score_type="reward", score_dim=2)
    score.save_score_model(tmp_path, cfg, params, head)
    config = hf.read_config(tmp_path)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForScore"]
    assert "model.layers.1.self_attn.k_proj.bias" in hf.read_safetensors_dir(tmp_path)
    cfg2, head2, params2, _ = score.load_score_model(tmp_path, scan_layers=False)
    assert cfg2 == cfg and head2 == head
    ids, mask = _padded([6, 4], 6, seed=4)
    before = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
    after = jax.jit(head2.model(cfg2).apply)({"params": params2}, ids, attention_mask=mask)
    np.testing.assert_allclose(after.end_scores, before.end_scores, atol=1e-6)
    # The backbone is the causal LM's: its hidden states are the LM's.
    lm = {"model": params["model"], "lm_head": {"kernel": np.zeros((32, TINY["vocab_size"]), np.float32)}}
    lm_hidden = _forward(cfg, lm, jnp.asarray(ids), jnp.asarray(mask)).hidden_states
    np.testing.assert_allclose(np.asarray(before.hidden_states)[mask], np.asarray(lm_hidden)[mask], atol=1e-5)
    fresh = score.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(0), score_dim=2)
    assert fresh["score_head"]["kernel"].shape == (32, 2)


def test_resize_token_embeddings_and_replace(tiny):
    cfg, params = tiny
    new_cfg, new_params = decoder.resize_token_embeddings(cfg, params, cfg.vocab_size + 3)
    assert type(new_cfg) is type(cfg) and new_cfg.vocab_size == cfg.vocab_size + 3
    assert new_params["model"]["embed_tokens"]["embedding"].shape == (cfg.vocab_size + 3, cfg.hidden_size)
    logits = _forward(new_cfg, new_params, jnp.asarray([[cfg.vocab_size + 2]])).logits
    assert logits.shape == (1, 1, cfg.vocab_size + 3)
    runtime = dataclasses.replace(cfg, dtype="bfloat16", scan_layers=False, remat_policy="full")
    assert type(runtime) is type(cfg) and runtime.model_type == cfg.model_type
    assert (runtime.eos_token_ids, runtime.pad_token_id, runtime.bos_token_id) == ((2, 3), PAD, 1)
    hash(runtime)


def test_config_round_trip_and_family_choice():
    for config_class in CONFIGS.values():
        cfg = config_class(**TINY, rope_theta=1e6, eos_token_id=[5, 6])
        hf_config = cfg.to_hf_config()
        assert families.config_from_hf(hf_config) == cfg
        assert models.config_from_hf(hf_config, dtype="bfloat16").dtype == "bfloat16"
    assert "attention_bias" not in qwen.Qwen2Config(**TINY).to_hf_config()
    # transformers' defaults: Qwen3 without head_dim means 128; Qwen2 means hidden / heads.
    assert families.config_from_hf(dict(TINY, model_type="qwen3")).head_dim == 128
    assert families.config_from_hf(dict(TINY, model_type="qwen2")).head_dim == 8
    # Qwen2 ignores attention_bias, as transformers does: q/k/v biases, no o_proj bias.
    qwen2 = families.config_from_hf(dict(TINY, model_type="qwen2", attention_bias=True))
    assert (qwen2.attention_options.qkv_bias, qwen2.attention_options.o_bias, qwen2.attention_bias) == (True, False, False)
    no_type = families.config_from_hf(TINY)
    assert type(no_type) is llama.LlamaConfig and families.of(no_type).architecture == "LlamaForCausalLM"
    assert isinstance(models.causal_lm(no_type), llama.Llama)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(model_type="mistral"), ["model_type='mistral'", "'llama'", "'qwen2'", "'qwen3'"]),
        (dict(model_type="qwen2", use_sliding_window=True), ["use_sliding_window"]),
        (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]), ["layer_types", "[1]"]),
        (dict(model_type="qwen3", hidden_act="gelu"), ["hidden_act", "gelu"]),
    ],
)
def test_unsupported_configs_are_one_clear_error(tmp_path, change, words):
    with pytest.raises(ValueError) as info:
        families.config_from_hf(dict(TINY, **change))
    for word in words:
        assert word in str(info.value)
    hf.write_config(tmp_path, dict(TINY, **change))
    with pytest.raises(hf.CheckpointError, match=r"config\.json") as info:
        hf.load_config(tmp_path)
    assert words[0] in str(info.value)


def test_family_configs_are_checked():
    # The families own their attention options: Llama's config has no Qwen switch to turn on.
    with pytest.raises(TypeError, match="qk_norm"):
        llama.LlamaConfig(**TINY, qk_norm=True)
    assert qwen.Qwen3Config(**TINY).attention_options.qk_norm and not llama.LlamaConfig(**TINY).attention_options.qk_norm
    with pytest.raises(ValueError, match="Qwen2Config.*attention_bias"):
        qwen.Qwen2Config(**TINY, attention_bias=True)
    with pytest.raises(ValueError, match="Qwen3Config.*mlp_bias"):
        qwen.Qwen3Config(**TINY, mlp_bias=True)
    with pytest.raises(ValueError, match="model_type='qwen2' is not 'llama'"):
        llama.LlamaConfig.from_hf_config(dict(TINY, model_type="qwen2"))
