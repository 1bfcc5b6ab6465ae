"""Score model: normalizers vs numpy, end scores with left/right padding, save/load round trip."""

import dataclasses

import numpy as np
import pytest

import jax.numpy as jnp

from jaxalign.models import score


def _numpy_running_mean_std(batches):
    """Upstream RunningMeanStd.update, one batch at a time."""
    mean, var, count = np.zeros(2), np.ones(2), 0
    for data in batches:
        batch_mean, batch_var, batch_count = data.mean(0), data.var(0, ddof=1), len(data)
        delta = batch_mean - mean
        total = count + batch_count
        new_mean = mean + delta * batch_count / total
        m2 = var * count + batch_var * batch_count + delta**2 * (count * batch_count / total)
        mean, var, count = new_mean, m2 / total, total
    return mean, var, count


def _numpy_ema(batches, momentum):
    mean, var, count = np.zeros(2), np.ones(2), 0
    for data in batches:
        mean = momentum * mean + (1 - momentum) * data.mean(0)
        var = momentum * var + (1 - momentum) * data.var(0, ddof=1)
        count += len(data)
    return mean, var, count


def _batches():
    rng = np.random.default_rng(0)
    return [rng.normal(loc=3.0, scale=2.0, size=(n, 2)) for n in (4, 7, 2, 16)]


def _fold(batches, normalizer_type, **kwargs):
    stats = score.init_normalizer(2)
    for data in batches:
        stats = score.update_normalizer(stats, jnp.asarray(data, jnp.float32), normalizer_type, **kwargs)
    return stats


def test_running_mean_std_matches_chan_merge_and_full_data_stats():
    batches = _batches()
    stats = _fold(batches, "RunningMeanStd")
    mean, var, count = _numpy_running_mean_std(batches)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5)
    assert int(stats["count"]) == count == 29


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_ema_normalizer(momentum):
    batches = _batches()
    stats = _fold(batches, "ExponentialMovingAverage", momentum=momentum)
    mean, var, count = _numpy_ema(batches, momentum)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5)
    assert int(stats["count"]) == count


def test_identity_normalizer_only_counts_and_bad_type():
    stats = _fold(_batches(), None)
    np.testing.assert_array_equal(stats["mean"], [0, 0])
    np.testing.assert_array_equal(stats["var"], [1, 1])
    assert int(stats["count"]) == 29
    with pytest.raises(ValueError, match="normalizer_type"):
        score.update_normalizer(stats, jnp.ones((2, 2)), "BatchNorm")


def test_normalize_functions_by_score_type():
    stats = {"mean": jnp.array([2.0]), "var": jnp.array([4.0]), "count": jnp.array(3)}
    x = jnp.array([[4.0], [-1.0]])
    np.testing.assert_allclose(score.normalize(x, stats, "reward"), [[1.0], [-1.5]], rtol=1e-6)
    np.testing.assert_allclose(score.normalize(x, stats, "cost"), [[2.0], [-0.5]], rtol=1e-6)
    np.testing.assert_array_equal(score.normalize(x, stats, "critic"), x)
    with pytest.raises(ValueError, match="score_type"):
        score.normalize(x, stats, "value")


# ---------------------------------------------------------------------------------------
# ScoreModel

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from jaxalign.models import hf, llama  # noqa: E402

TINY = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TINY_RUNTIME = dict(scan_layers=False)  # faster to compile; the stage test covers scan


def _host_params(model, seed=0):
    """Random params of `model` in numpy (no init compile): N(0, 0.3) so scores differ."""
    ids = np.zeros((1, 1), np.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny():
    cfg = llama.LlamaConfig.from_hf_config(TINY, **TINY_RUNTIME)
    return cfg, _host_params(score.ScoreModel(cfg, score_dim=2))


def test_param_tree_shares_the_llama_backbone(tiny):
    cfg, params = tiny
    assert set(params) == {"model", "score_head"}
    assert params["score_head"]["kernel"].shape == (16, 2)
    assert params["score_head"]["bias"].shape == (2,)
    lm_params = jax.eval_shape(llama.Llama(cfg).init, jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32))
    lm_backbone = nn.meta.unbox(lm_params["params"]["model"])
    same = jax.tree.map(lambda a, b: a.shape == b.shape, lm_backbone, params["model"])
    assert all(jax.tree.leaves(same))
    # Flax init (random-init runs); unoptimised XLA compiles the RNG code much faster.
    ids = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(score.ScoreModel(cfg, score_dim=2).init).lower(jax.random.PRNGKey(3), ids)
    init = init.compile(compiler_options={"xla_backend_optimization_level": 0})
    fresh = nn.meta.unbox(init(jax.random.PRNGKey(3), ids)["params"])
    np.testing.assert_array_equal(fresh["score_head"]["bias"], [0.0, 0.0])
    assert 0.01 < float(jnp.std(fresh["score_head"]["kernel"])) < 0.04  # N(0, 0.02)
    # Init from a policy's backbone (score stage): backbone kept, fresh head.
    head_init = score.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(4), score_dim=2)
    assert head_init["model"] is params["model"]
    np.testing.assert_array_equal(head_init["score_head"]["bias"], [0.0, 0.0])
    assert 0.01 < float(jnp.std(head_init["score_head"]["kernel"])) < 0.04


def test_end_scores_left_and_right_padding(tiny):
    cfg, params = tiny
    apply = jax.jit(score.ScoreModel(cfg, score_dim=2).apply)
    tokens = np.array([[3, 7, 9, 11], [5, 6, 0, 0]])
    right_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    right = apply({"params": params}, tokens, attention_mask=right_mask)
    np.testing.assert_array_equal(right.end_index, [3, 1])
    left_tokens = np.array([[3, 7, 9, 11], [0, 0, 5, 6]])
    left_mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], bool)
    left = apply({"params": params}, left_tokens, attention_mask=left_mask)
    np.testing.assert_array_equal(left.end_index, [3, 3])
    assert right.scores.shape == (2, 4, 2) and right.scores.dtype == jnp.float32
    np.testing.assert_allclose(right.end_scores[0], right.scores[0, 3])
    np.testing.assert_allclose(right.end_scores[1], right.scores[1, 1])
    # Same tokens and positions on either side of the padding -> the same end score.
    np.testing.assert_allclose(left.end_scores, right.end_scores, atol=1e-5)
    # The short row alone, unpadded, gives the same end score: padding is invisible.
    alone = apply({"params": params}, tokens[1:, :2])
    np.testing.assert_allclose(alone.end_scores[0], right.end_scores[1], atol=1e-5)
    np.testing.assert_allclose(right.end_hidden_states[1], right.hidden_states[1, 1])


def test_save_load_round_trip(tiny, tmp_path):
    cfg, params = tiny
    head = score.ScoreHead(score_type="cost", score_dim=2, normalizer_type="ExponentialMovingAverage", momentum=0.9)
    stats = {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([2.0, 3.0]), "count": jnp.array(12)}
    score.save_score_model(tmp_path, cfg, params, head, stats)
    config = hf.read_config(tmp_path)
    assert config["score_type"] == "cost" and config["mean"] == [0.5, -1.0] and config["count"] == 12
    assert config["architectures"] == ["LlamaForScore"]
    tensors = hf.read_safetensors_dir(tmp_path)
    assert tensors.shape("score_head.weight") == (2, 16)
    assert "model.layers.1.self_attn.q_proj.weight" in tensors
    cfg2, head2, params2, stats2 = score.load_score_model(tmp_path)
    # Loaded with the default runtime fields: layers stacked for nn.scan this time.
    assert head2 == head and dataclasses.replace(cfg2, scan_layers=False) == cfg and cfg2.scan_layers
    np.testing.assert_allclose(stats2["var"], [2.0, 3.0])
    assert int(stats2["count"]) == 12
    ids = np.array([[1, 4, 9, 2, 0]])
    mask = ids != 0
    before = jax.jit(score.ScoreModel(cfg, 2).apply)({"params": params}, ids, attention_mask=mask)
    after = jax.jit(head2.model(cfg2).apply)({"params": params2}, ids, attention_mask=mask)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    _, critic_head, _, _ = score.load_score_model(tmp_path, score_type="critic")
    assert critic_head.score_type == "critic"


def test_load_errors_name_the_problem(tiny, tmp_path):
    cfg, params = tiny
    with pytest.raises(score.ScoreModelError, match="does not exist"):
        score.load_score_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(hf.CheckpointError, match="config.json"):
        score.load_score_model(tmp_path / "empty")
    lm_params = {"model": params["model"], "lm_head": {"kernel": np.zeros((16, 50), np.float32)}}
    hf.save_pretrained(tmp_path / "llama", cfg, lm_params)
    with pytest.raises(score.ScoreModelError, match="not a score model"):
        score.load_score_model(tmp_path / "llama")
    head = score.ScoreHead(score_dim=2)
    score.save_score_model(tmp_path / "ok", cfg, params, head)
    config = hf.read_config(tmp_path / "ok")
    hf.write_config(tmp_path / "ok", dict(config, score_dim=3, mean=None, var=None))
    with pytest.raises(hf.CheckpointError, match="score_head.weight"):
        score.load_score_model(tmp_path / "ok")
    hf.write_config(tmp_path / "ok", dict(config, score_type="value"))
    with pytest.raises(score.ScoreModelError, match="score_type"):
        score.load_score_model(tmp_path / "ok")
