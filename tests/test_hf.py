"""HF checkpoint I/O: round trips with transformers, sharding, and clear errors on bad input."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxalign.models import decoder, hf, llama

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A jaxalign-initialised tiny Llama (untied, with biases) saved as an HF dir."""
    cfg = llama.LlamaConfig(**TINY, attention_bias=True, eos_token_id=[2, 3])
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    # Non-trivial norms and biases so layout mistakes show up in the logits.
    noise = np.random.RandomState(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * noise.standard_normal(x.shape).astype(np.float32)
        if any(getattr(k, "key", None) in ("scale", "bias") for k in path)
        else x,
        params,
    )
    path = tmp_path_factory.mktemp("ckpt") / "model"
    hf.save_pretrained(path, cfg, params)
    return cfg, params, path


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids):
    return llama.Llama(cfg).apply({"params": params}, ids).logits


def _logits(cfg, params, ids):
    return np.asarray(_forward(cfg, params, jnp.asarray(ids)))


def _torch_logits(path, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def test_roundtrip_through_transformers(saved):
    cfg, params, path = saved
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    ours = _logits(cfg, params, ids)
    np.testing.assert_allclose(_torch_logits(path, ids), ours, atol=1e-4, rtol=0)
    cfg2, params2 = hf.from_pretrained(path, dtype="float32")
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config = json.loads((path / "config.json").read_text())
    assert config["eos_token_id"] == [2, 3] and config["model_type"] == "llama"


def test_tied_roundtrip_and_unscanned_layout(saved, tmp_path):
    cfg, params, _ = saved
    cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    params = {"model": params["model"]}
    hf.save_pretrained(tmp_path, cfg, params)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 7))
    np.testing.assert_allclose(_torch_logits(tmp_path, ids), _logits(cfg, params, ids), atol=1e-4)
    # The same directory loads into the per-layer (unscanned) layout.
    cfg_u, params_u = hf.from_pretrained(tmp_path, scan_layers=False)
    assert "layers_1" in params_u["model"] and "layers" not in params_u["model"]
    np.testing.assert_allclose(_logits(cfg_u, params_u, ids), _logits(cfg, params, ids), atol=2e-5)


def test_sharded_save_loads_in_both(saved, tmp_path):
    cfg, params, _ = saved
    hf.save_pretrained(tmp_path, cfg, params, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 8))
    ours = _logits(cfg, params, ids)
    np.testing.assert_allclose(_torch_logits(tmp_path, ids), ours, atol=1e-4)
    cfg2, params2 = hf.from_pretrained(tmp_path)
    np.testing.assert_allclose(_logits(cfg2, params2, ids), ours, atol=1e-6)


def test_backbone_tensor_functions_roundtrip(saved):
    cfg, params, _ = saved
    tensors = hf.backbone_to_hf_tensors(cfg, params["model"], prefix="model.")
    assert set(tensors) == set(hf.backbone_hf_shapes(cfg))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (32, 32)  # [out, in]
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    back = hf.backbone_from_hf_tensors(cfg, tensors, prefix="model.")
    for a, b in zip(jax.tree_util.tree_leaves(params["model"]), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rewrite(src, dst, edit):
    tensors = dict(load_file(str(src / "model.safetensors")))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "bad", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.from_pretrained(bad)


def test_wrong_shape_is_named(saved, tmp_path):
    _, _, path = saved

    def edit(t):
        t["model.layers.0.self_attn.v_proj.weight"] = np.zeros((8, 32), np.float32)

    bad = _rewrite(path, tmp_path / "bad", edit)
    with pytest.raises(hf.CheckpointError) as info:
        hf.from_pretrained(bad)
    message = str(info.value)
    assert "model.layers.0.self_attn.v_proj.weight" in message
    assert "expected shape (16, 32), got (8, 32)" in message


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, _, path = saved

    def edit(t):
        t["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)

    bad = _rewrite(path, tmp_path / "bad", edit)
    with pytest.raises(hf.CheckpointError, match="unexpected tensors.*self_attn.extra.weight"):
        hf.from_pretrained(bad)


def test_bad_config_errors(saved, tmp_path):
    _, _, path = saved
    bad = _rewrite(path, tmp_path / "bad", lambda t: None)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(hf.CheckpointError, match=r"malformed .*config\.json"):
        hf.from_pretrained(bad)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*rope_type='dynamic'"):
        hf.from_pretrained(bad)
    del config["rope_scaling"], config["hidden_size"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing required keys: \['hidden_size'\]"):
        hf.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        hf.from_pretrained(bad)


def test_bfloat16_params_roundtrip(saved, tmp_path):
    cfg, params, _ = saved
    cfg16 = dataclasses.replace(cfg, param_dtype="bfloat16")
    hf.save_pretrained(tmp_path, cfg16, params)
    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype == jnp.bfloat16
    cfg2, params2 = hf.from_pretrained(tmp_path, param_dtype="bfloat16")
    assert params2["model"]["norm"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params2["model"]["norm"]["scale"]),
        np.asarray(params["model"]["norm"]["scale"].astype(jnp.bfloat16)),
    )


def test_malformed_safetensors_names_the_file(saved, tmp_path):
    _, _, path = saved
    garbage = _rewrite(path, tmp_path / "garbage", lambda t: None)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(hf.CheckpointError, match=r"malformed safetensors file .*garbage/model\.safetensors"):
        hf.from_pretrained(garbage)
    truncated = _rewrite(path, tmp_path / "truncated", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(hf.CheckpointError, match=r"truncated/model\.safetensors"):
        hf.read_safetensors_dir(truncated)
    # One bad shard of a sharded checkpoint is the one named.
    cfg, params, _ = saved
    hf.save_pretrained(tmp_path / "sharded", cfg, params, max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).write_bytes(b"short")
    with pytest.raises(hf.CheckpointError, match=rf"malformed safetensors file .*sharded/{shard}"):
        hf.from_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize("target", ["../outside.safetensors", "sub/../../outside.safetensors", "/tmp/outside.safetensors"])
def test_weight_map_pointing_outside_the_folder_is_refused(saved, tmp_path, target):
    cfg, params, path = saved
    # A loadable file really is there: only the check stops it from being read.
    (tmp_path / "outside.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((path / "config.json").read_text())
    names = load_file(str(path / "model.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    with pytest.raises(hf.CheckpointError, match="points outside") as info:
        hf.from_pretrained(ckpt)
    assert "model.safetensors.index.json" in str(info.value) and repr(target) in str(info.value)


def test_weight_map_must_match_the_shards(saved, tmp_path):
    cfg, params, _ = saved
    hf.save_pretrained(tmp_path, cfg, params, max_shard_size="20KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.norm.weight"
    right = index["weight_map"][name]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=f"model.norm.weight -> {wrong}"):
        hf.read_safetensors_dir(tmp_path)
    index_file.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(hf.CheckpointError, match="malformed .*index.json: weight_map must map"):
        hf.read_safetensors_dir(tmp_path)
