"""Moderation model, objective and metrics, each against an independent numpy computation."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import models
from jaxalign.evaluate import moderation as ev
from jaxalign.models import hf, llama, loading
from jaxalign.models import moderation as mm
from jaxalign.objectives import moderation as obj
from jaxalign.parallel import mesh as mesh_lib

C, S = 19, 4


def _cfg(**extra):
    return llama.LlamaConfig.from_hf_config(dict(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, **extra))


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    head = mm.ModerationHead(threshold=0.3, category_thresholds=np.linspace(0.1, 0.9, 19).tolist())
    module = head.model(cfg)
    params = nn.meta.unbox(jax.jit(loading.init_fn(module))(jax.random.PRNGKey(0)))
    for name in mm.HEAD_NAMES:  # non-zero biases, so the round trips check them too
        params[name]["bias"] = params[name]["bias"] + 0.1
    return cfg, head, module, params


# ----------------------------------------------------------------------------------- model


def test_every_position_is_the_end_score_of_its_prefix(model):
    """Streaming: the heads at token t equal the end outputs of the sequence cut after t (causal)."""
    cfg, head, module, params = model
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False  # right padding
    out = module.apply({"params": params}, ids, attention_mask=mask)
    assert out.unsafe_logits.shape == (2, 9) and out.category_logits.shape == (2, 9, C)
    assert out.severity_logits.shape == (2, 9, S)
    np.testing.assert_array_equal(out.end_index, [8, 6])
    for t in (0, 3, 6):
        prefix = module.apply({"params": params}, ids[:, :t + 1], attention_mask=mask[:, :t + 1])
        np.testing.assert_allclose(prefix.end_unsafe_logits, out.unsafe_logits[:, t], atol=1e-5)
        np.testing.assert_allclose(prefix.end_category_logits, out.category_logits[:, t], atol=1e-5)
        np.testing.assert_allclose(prefix.end_severity_logits, out.severity_logits[:, t], atol=1e-5)
    np.testing.assert_allclose(out.end_unsafe_logits[1], out.unsafe_logits[1, 6])


def test_save_load_round_trip_and_loader(model, tmp_path):
    cfg, head, module, params = model
    mm.save_moderation_model(tmp_path / "mod", cfg, params, head)
    config = json.loads((tmp_path / "mod" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForModeration"] and config["threshold"] == 0.3
    assert config["category_names"][0] == "Endangering National Security" and config["num_severities"] == 4
    cfg2, head2, params2 = mm.load_moderation_model(tmp_path / "mod")
    assert head2 == head
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSettings())
    rules = mesh_lib.axis_rules(mesh_lib.MeshSettings())
    placed = loading.load_moderation_model(loading.ModelSettings(init_path=str(tmp_path / "mod")), mesh, rules)
    ids = np.arange(1, 9, dtype=np.int32).reshape(1, 8).repeat(8, 0)
    a = module.apply({"params": params}, ids).end_category_logits
    b = placed.module.apply({"params": placed.params}, ids).end_category_logits
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert placed.head.threshold == 0.3

    # a causal-LM dir: its backbone + fresh heads (zero biases)
    lm_params = models.init_params(cfg, jax.random.PRNGKey(3))
    hf.save_pretrained(tmp_path / "lm", cfg, lm_params)
    fresh = loading.load_moderation_model(loading.ModelSettings(init_path=str(tmp_path / "lm")), mesh, rules,
                                          head=mm.ModerationHead(), vocab_size=cfg.vocab_size,
                                          rng=jax.random.PRNGKey(4))
    jax.tree.map(np.testing.assert_allclose, jax.device_get(fresh.params["model"]), jax.device_get(lm_params["model"]))
    np.testing.assert_array_equal(fresh.params["severity_head"]["bias"], np.zeros(S))
    with pytest.raises(ValueError, match="not a moderation model"):
        loading.load_moderation_model(loading.ModelSettings(init_path=str(tmp_path / "lm")), mesh, rules)
    with pytest.raises(mm.ModerationModelError, match="not a moderation model"):
        mm.load_moderation_model(tmp_path / "lm")
    with pytest.raises(mm.ModerationModelError, match="does not exist"):
        mm.load_moderation_model(tmp_path / "missing")
    bad = dict(config, num_categories=3)
    (tmp_path / "mod" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(mm.ModerationModelError, match="category_names has 19 names, num_categories is 3"):
        mm.load_moderation_model(tmp_path / "mod")


def test_any_family_backbone():
    cfg = models.config_from_hf(dict(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=64))
    module = mm.ModerationHead().model(cfg)
    params = nn.meta.unbox(jax.jit(loading.init_fn(module))(jax.random.PRNGKey(0)))
    out = module.apply({"params": params}, jnp.ones((2, 5), jnp.int32))
    assert out.end_severity_logits.shape == (2, S)


# ----------------------------------------------------------------------------------- objective


def _np_bce(x, y, w=1.0):
    p = 1.0 / (1.0 + math.exp(-x))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def _np_position_loss(u, c, s, label, settings):
    is_unsafe = 0.0 if label["is_safe"] else 1.0
    w = settings.category_pos_weight or [1.0] * C
    category = sum(_np_bce(c[k], float(label["categories"][k]), w[k]) for k in range(C)) / C
    log_z = math.log(sum(math.exp(v) for v in s))
    severity = log_z - s[label["severity"]]
    return (settings.unsafe_coeff * _np_bce(u, is_unsafe) + settings.category_coeff * category
            + settings.severity_coeff * severity)


@pytest.mark.parametrize("stream_coeff", [0.0, 0.5])
def test_loss_against_numpy(stream_coeff):
    rng = np.random.default_rng(0)
    B, T = 3, 7
    mask = np.ones((B, T), bool)
    mask[0, 5:] = False
    mask[2, 6:] = False
    response = mask.copy()
    response[:, :3] = False  # prompt = 3 tokens
    response[1, 3:] = False  # row 1: only its end token is a response token -> no prefix terms
    response[1, 6] = True
    batch = {"is_safe": np.array([True, False, False]), "severity": np.array([0, 2, 3], np.int32),
             "categories": rng.random((B, C)) < 0.2, "response_mask": response, "attention_mask": mask}
    batch["categories"][0] = False
    end_index = np.array([4, 6, 5])
    out = mm.ModerationOutput(
        unsafe_logits=jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
        category_logits=jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32),
        severity_logits=jnp.asarray(rng.normal(size=(B, T, S)), jnp.float32),
        end_unsafe_logits=None, end_category_logits=None, end_severity_logits=None, end_index=jnp.asarray(end_index))
    take = lambda x: x[np.arange(B), end_index]  # noqa: E731
    out = out.replace(end_unsafe_logits=take(out.unsafe_logits), end_category_logits=take(out.category_logits),
                      end_severity_logits=take(out.severity_logits))
    weights = obj.positive_weights(rng.random((50, C)) < 0.1, 10.0)
    settings = obj.ModerationLossSettings(unsafe_coeff=1.0, category_coeff=2.0, severity_coeff=0.5,
                                          stream_coeff=stream_coeff, category_pos_weight=obj.as_tuple(weights))
    loss, metrics = obj.moderation_loss(out, {k: jnp.asarray(v) for k, v in batch.items()}, settings)

    u, c, s = (np.asarray(x, np.float64) for x in (out.unsafe_logits, out.category_logits, out.severity_logits))
    expected_end, expected_stream = 0.0, 0.0
    for b in range(B):
        label = {k: batch[k][b] for k in ("is_safe", "severity", "categories")}
        e = end_index[b]
        expected_end += _np_position_loss(u[b, e], c[b, e], s[b, e], label, settings) / B
        prefix = [t for t in range(T) if response[b, t] and t != e]
        if prefix:
            expected_stream += sum(_np_position_loss(u[b, t], c[b, t], s[b, t], label, settings)
                                   for t in prefix) / len(prefix) / B
    np.testing.assert_allclose(float(metrics["end_loss"]), expected_end, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected_end + stream_coeff * expected_stream, rtol=1e-5)
    assert ("stream_loss" in metrics) == (stream_coeff > 0)


def test_positive_weights_against_loop():
    labels = np.zeros((40, 4), bool)
    labels[:2, 0] = True  # 2 positives: 38/2 = 19 -> capped at 10
    labels[:10, 1] = True  # 30/10 = 3
    labels[:30, 2] = True  # 10/30 < 1 -> 1
    weights = obj.positive_weights(labels, max_pos_weight=10.0)
    expected = []
    for k in range(4):
        pos = sum(labels[:, k])
        expected.append(1.0 if pos == 0 else min(10.0, max(1.0, (40 - pos) / pos)))
    np.testing.assert_allclose(weights, expected)
    np.testing.assert_allclose(weights, [10.0, 3.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(1)
    n = 200
    y = rng.random(n) < 0.4
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    p[:20] = np.round(p[:20], 1)  # ties
    return y, p


def test_binary_and_threshold_against_loops(scored):
    y, p = scored
    for threshold in (0.2, 0.5, 0.8):
        got = ev.binary_metrics(y, p >= threshold)
        tp = fp = fn = tn = 0
        for yi, pi in zip(y, p):
            pred = pi >= threshold
            tp += yi and pred
            fp += (not yi) and pred
            fn += yi and not pred
            tn += (not yi) and not pred
        assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (tp, fp, fn, tn)
        assert got["precision"] == pytest.approx(tp / (tp + fp))
        assert got["recall"] == pytest.approx(tp / (tp + fn))
        assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert got["accuracy"] == pytest.approx((tp + tn) / len(y))
    best_t, best_f1 = None, -1.0
    for t in sorted(set(p.tolist())):  # ascending: a later tie (higher t) wins with >=
        f1 = ev.binary_metrics(y, p >= t)["f1"]
        if f1 >= best_f1:
            best_t, best_f1 = t, f1
    below = max(v for v in p if v < best_t)  # the midpoint to the next lower distinct score
    t, f1 = ev.best_threshold(y, p)
    assert (t, f1) == pytest.approx(((best_t + below) / 2, best_f1))
    assert ev.binary_metrics(y, p >= t)["f1"] == pytest.approx(best_f1)
    # separable scores: the middle of the gap between the highest negative and the lowest positive
    assert ev.best_threshold(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.3, 0.7, 0.9])) == pytest.approx((0.5, 1.0))


def test_auroc_ap_ece_against_independent_formulas(scored):
    y, p = scored
    pos, neg = p[y], p[~y]
    mann_whitney = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert ev.roc_curve(y, p)[2] == pytest.approx(mann_whitney)
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(p.tolist()), reverse=True):
        pred = p >= t
        recall = (pred & y).sum() / y.sum()
        ap += (recall - previous_recall) * (pred & y).sum() / pred.sum()
        previous_recall = recall
    assert ev.pr_curve(y, p)[2] == pytest.approx(ap)
    ece = 0.0
    for b in range(10):
        low, high = b / 10, (b + 1) / 10
        inside = [(yi, pi) for yi, pi in zip(y, p) if low <= pi < high or (b == 9 and pi == 1.0)]
        if inside:
            ece += len(inside) / len(y) * abs(np.mean([v[0] for v in inside]) - np.mean([v[1] for v in inside]))
    assert ev.expected_calibration_error(y, p) == pytest.approx(ece)
    assert ev.expected_calibration_error(np.array([True, False]), np.array([1.0, 0.0])) == 0.0


def test_category_severity_streaming_against_loops():
    rng = np.random.default_rng(2)
    n, names = 60, [f"c{k}" for k in range(5)]
    labels = rng.random((n, 5)) < 0.3
    predicted = rng.random((n, 5)) < 0.3
    labels[:, 4] = predicted[:, 4] = False  # undefined F1
    got = ev.category_metrics(labels, predicted, names)
    f1s, tps, fps, fns = [], 0, 0, 0
    for k in range(4):
        tp = sum(labels[i, k] and predicted[i, k] for i in range(n))
        fp = sum((not labels[i, k]) and predicted[i, k] for i in range(n))
        fn = sum(labels[i, k] and not predicted[i, k] for i in range(n))
        f1s.append(2 * tp / (2 * tp + fp + fn))
        tps, fps, fns = tps + tp, fps + fp, fns + fn
        assert got["per_category"][f"c{k}"]["f1"] == pytest.approx(f1s[-1])
        assert got["per_category"][f"c{k}"]["support"] == tp + fn
    assert got["per_category"]["c4"]["f1"] is None
    assert got["macro_f1"] == pytest.approx(np.mean(f1s))
    assert got["micro_f1"] == pytest.approx(2 * tps / (2 * tps + fps + fns))

    true_sev, pred_sev = rng.integers(0, 4, n), rng.integers(0, 4, n)
    sev = ev.severity_metrics(true_sev, pred_sev, 4)
    confusion = [[0] * 4 for _ in range(4)]
    for a, b in zip(true_sev, pred_sev):
        confusion[a][b] += 1
    assert sev["confusion"] == confusion
    assert sev["accuracy"] == pytest.approx(np.mean(true_sev == pred_sev))

    unsafe = np.array([True, True, True, False, False, False])
    first = np.array([2, -1, 0, -1, 4, -1])
    length = np.array([10, 5, 4, 6, 8, 3])
    stream = ev.streaming_metrics(unsafe, first, length)
    assert stream["unsafe_flagged_rate"] == pytest.approx(2 / 3)
    assert stream["first_flag_token_mean"] == pytest.approx(1.0)
    assert stream["first_flag_fraction_read_mean"] == pytest.approx(np.mean([3 / 10, 1 / 4]))
    assert stream["false_alarm_rate"] == pytest.approx(1 / 3)


def test_decide_rule():
    unsafe = np.array([0.2, 0.7, 0.9])
    categories = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.8]])
    severity = np.array([[0.1, 0.2, 0.3, 0.4], [0.9, 0.02, 0.05, 0.03], [0.0, 0.5, 0.2, 0.3]])
    is_unsafe, flagged, level = ev.decide(unsafe, categories, severity, threshold=0.5)
    np.testing.assert_array_equal(is_unsafe, [False, True, True])
    np.testing.assert_array_equal(flagged, [[False, False], [False, True], [True, True]])  # safe: none; >=1 if unsafe
    np.testing.assert_array_equal(level, [0, 2, 1])  # unsafe: 1 + argmax over levels 1..3
    # per-category thresholds
    _, flagged, _ = ev.decide(unsafe, categories, severity, threshold=0.5, category_threshold=np.array([0.7, 0.25]))
    np.testing.assert_array_equal(flagged, [[False, False], [False, True], [False, True]])
    head = mm.ModerationHead(category_thresholds=[0.1] * 19)
    np.testing.assert_allclose(head.category_cutoffs(), 0.1)
    np.testing.assert_allclose(mm.ModerationHead(category_threshold=0.3).category_cutoffs(), [0.3] * 19)
    with pytest.raises(ValueError, match="category_thresholds must be 19 values"):
        mm.ModerationHead(category_thresholds=[0.1, 0.2])


def test_scorer_first_flag_and_report(model):
    """The scorer's end probabilities and first flagged response token against the model's
    per-token outputs computed here with numpy."""
    cfg, head, module, params = model
    rng = np.random.default_rng(3)
    n, length = 11, 12
    ids = rng.integers(1, cfg.vocab_size, (n, length)).astype(np.int32)
    lengths = rng.integers(6, length + 1, n)
    mask = np.arange(length)[None] < lengths[:, None]
    response = mask & (np.arange(length)[None] >= 4)
    arrays = {"input_ids": ids, "attention_mask": mask, "response_mask": response,
              "is_safe": rng.random(n) < 0.5, "categories": rng.random((n, C)) < 0.1,
              "severity": rng.integers(0, 4, n).astype(np.int32)}
    mesh = mesh_lib.make_mesh(mesh_lib.MeshSettings())
    rules = mesh_lib.axis_rules(mesh_lib.MeshSettings())
    threshold = 0.5
    scores = ev.make_scorer(module, mesh, rules)(params, arrays, batch_size=8, threshold=threshold)
    out = module.apply({"params": params}, ids, attention_mask=mask)
    stream = 1 / (1 + np.exp(-np.asarray(out.unsafe_logits, np.float64)))
    for i in range(n):
        offsets = [t - 4 for t in range(length) if response[i, t] and stream[i, t] >= threshold]
        assert scores["first_flag"][i] == (offsets[0] if offsets else -1)
        assert scores["response_length"][i] == response[i].sum()
    np.testing.assert_allclose(scores["unsafe"], 1 / (1 + np.exp(-np.asarray(out.end_unsafe_logits))), rtol=1e-4)
    np.testing.assert_allclose(scores["severity"].sum(-1), 1.0, rtol=1e-5)
    assert "stream" not in scores
    per_token = ev.make_scorer(module, mesh, rules)(params, arrays, batch_size=8, threshold=threshold, per_token=True)
    np.testing.assert_allclose(per_token["stream"], np.where(response, stream, 0.0), rtol=1e-4, atol=1e-6)
    report = ev.moderation_report(scores, arrays, head)
    assert report["examples"] == n and set(report) >= {"unsafe", "categories", "severity", "streaming"}
    json.dumps(report)


def test_cost_signals_against_numpy(model):
    """The RL cost signals per token: P(unsafe), expected severity, P(severity 3), P(category)."""
    cfg, _, module, params = model
    ids = np.arange(1, 13, dtype=np.int32).reshape(2, 6)
    out = module.apply({"params": params}, ids)
    sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
    logits = np.asarray(out.severity_logits, np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(mm.cost_signal(out, "unsafe"), sigmoid(out.unsafe_logits), rtol=1e-5)
    np.testing.assert_allclose(mm.cost_signal(out, "expected_severity"), probs @ np.arange(4), rtol=1e-5)
    np.testing.assert_allclose(mm.cost_signal(out, "severity3"), probs[..., 3], rtol=1e-5)
    np.testing.assert_allclose(mm.cost_signal(out, "category:5"), sigmoid(out.category_logits[..., 5]), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown moderation cost signal"):
        mm.cost_signal(out, "bogus")
