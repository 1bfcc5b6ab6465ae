"""Streaming HF loads (models/loading.py place_streamed + hf plans): the same params, dtypes and
shardings as reading every tensor first and placing the tree, for scanned and unscanned layers,
sharded checkpoints, a grown vocabulary, Llama and Qwen2 (biases) on an FSDP x tensor mesh."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxalign import models
from jaxalign.models import hf, loading, score
from jaxalign.parallel import mesh as mesh_lib

TINY = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _mesh():
    config = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2, axis_rules=mesh_lib.DEFAULT_AXIS_RULES))
    return mesh_lib.make_mesh(config, jax.devices()[:8]), mesh_lib.axis_rules(config)


def _checkpoint(tmp_path, model_type, tie):
    hf_config = dict(TINY, model_type=model_type, tie_word_embeddings=tie)
    cfg = models.config_from_hf(hf_config)
    shapes = jax.eval_shape(loading.init_fn(models.causal_lm(cfg)), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, shapes,
                                       is_leaf=lambda b: hasattr(b, "value")))
    hf.save_pretrained(tmp_path / "ckpt", cfg, params, max_shard_size="8KB")  # several shard files
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 2
    return tmp_path / "ckpt"


def _eager(settings, vocab_size, mesh, rules, param_dtype):
    """The reference: every tensor read on the host, resized, then the whole tree placed."""
    cfg = loading.model_config(settings, vocab_size=vocab_size)
    shardings = loading.param_shardings(models.causal_lm(cfg), mesh, rules)
    stored = hf.load_config(settings.init_path, **settings.runtime())
    host = hf.params_from_hf_tensors(stored, hf.read_safetensors_dir(settings.init_path))
    host = loading._resized_host(stored, host, vocab_size)
    return loading.place(host, shardings, np.dtype(param_dtype)), shardings


@pytest.mark.parametrize("model_type,tie,scan,vocab,param_dtype", [
    ("llama", False, True, 48, "float32"),
    ("llama", False, True, 52, "bfloat16"),  # grown vocabulary (new rows = mean), bf16 params
    ("llama", True, False, 50, "float32"),  # tied embeddings, unscanned layers
    ("qwen2", False, True, 50, "float32"),  # q/k/v biases
])
def test_streamed_load_equals_the_eager_load(tmp_path, model_type, tie, scan, vocab, param_dtype):
    path = _checkpoint(tmp_path, model_type, tie)
    mesh, rules = _mesh()
    settings = loading.ModelSettings(init_path=str(path), scan_layers=scan, param_dtype=param_dtype)
    expected, shardings = _eager(settings, vocab, mesh, rules, param_dtype)
    placed = loading.load_policy(settings, mesh, rules, vocab_size=vocab, rng=jax.random.PRNGKey(0))
    assert jax.tree.structure(placed.params) == jax.tree.structure(expected)
    for (keys, got), want, sharding in zip(jax.tree_util.tree_leaves_with_path(placed.params),
                                           jax.tree.leaves(expected), jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(keys)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.sharding == sharding == want.sharding, name
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name)
    if scan:  # a stacked leaf really is sharded (no device holds it whole)
        kernel = placed.params["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
        assert kernel.addressable_shards[0].data.shape[1:] != kernel.shape[1:]


def test_streamed_backbone_with_a_fresh_head(tmp_path):
    path = _checkpoint(tmp_path, "llama", False)
    mesh, rules = _mesh()
    settings = loading.ModelSettings(init_path=str(path))
    head = score.ScoreHead(score_type="reward")
    placed = loading.load_backbone_with_head(settings, head, mesh, rules, vocab_size=50, rng=jax.random.PRNGKey(3))
    expected, _ = _eager(settings, 50, mesh, rules, "float32")
    for got, want in zip(jax.tree.leaves(placed.params["model"]), jax.tree.leaves(expected["model"])):
        np.testing.assert_array_equal(got, want)
    fresh = score.init_params_from_backbone(None, placed.cfg, jax.random.PRNGKey(3))["score_head"]
    np.testing.assert_array_equal(placed.params["score_head"]["kernel"], fresh["kernel"])


def test_the_reader_reads_tensors_with_pread(tmp_path):
    """SafetensorsReader returns the stored bytes (fp32, bf16) without memory-mapping the data."""
    import ml_dtypes

    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
               "b": np.linspace(-2, 2, 10).astype(ml_dtypes.bfloat16)}
    hf.write_safetensors(tmp_path, tensors, max_shard_size=40)
    reader = hf.read_safetensors_dir(tmp_path)
    for name, value in tensors.items():
        got = reader[name]
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got.astype(np.float32), value.astype(np.float32))


@pytest.mark.parametrize("scan", [True, False])
def test_streamed_score_model_equals_the_eager_load(tmp_path, scan):
    """loading.load_score_model streams a score-model dir: the same params, shardings, head and
    statistics as score.load_score_model's host arrays placed whole."""
    cfg = models.config_from_hf(dict(TINY, model_type="llama"))
    module = score.ScoreModel(cfg, score_dim=2)
    shapes = jax.eval_shape(loading.init_fn(module), jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda b: rng.normal(size=b.value.shape).astype(np.float32), shapes,
                          is_leaf=lambda b: hasattr(b, "value"))
    head = score.ScoreHead(score_type="cost", score_dim=2, normalizer_type="ExponentialMovingAverage", momentum=0.9)
    stats = {"mean": np.array([0.5, -1.0]), "var": np.array([2.0, 3.0]), "count": np.array(12)}
    score.save_score_model(tmp_path / "cost", cfg, params, head, stats, max_shard_size="8KB")
    mesh, rules = _mesh()
    settings = loading.ModelSettings(scan_layers=scan)
    placed = loading.load_score_model(tmp_path / "cost", mesh, rules, settings, score_type="critic")
    runtime = settings.runtime()
    eager_cfg, eager_head, host, eager_stats = score.load_score_model(
        tmp_path / "cost", dtype=runtime.pop("dtype"), score_type="critic", on_host=True, **runtime)
    assert placed.cfg == eager_cfg and placed.head == eager_head and placed.head.score_type == "critic"
    for name in ("mean", "var", "count"):
        np.testing.assert_array_equal(placed.stats[name], eager_stats[name])
    expected = loading.place(host, placed.shardings)
    assert jax.tree.structure(placed.params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(placed.params), jax.tree.leaves(expected)):
        assert got.sharding == want.sharding and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    with pytest.raises(score.ScoreModelError, match="does not exist"):
        loading.load_score_model(tmp_path / "missing", mesh, rules)
