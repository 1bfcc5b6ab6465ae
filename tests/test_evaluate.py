"""`jaxalign evaluate reward|cost`: files exist and the JSON numbers match a direct computation."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign.data import mini, pipeline, pku_saferlhf, views
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import llama, score
from jaxalign.models import tokenizer as tokenizer_lib

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Mini data, tokenizer, and one random score model saved as a reward and as a cost model."""
    root = tmp_path_factory.mktemp("evaluate")
    mini.write_mini(root / "mini", rows=300)
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "mini"), 320, root / "tok")
    cfg = llama.LlamaConfig.from_hf_config(dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    ))
    model = score.ScoreModel(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32), shapes)
    for score_type in ("reward", "cost"):
        score.save_score_model(root / score_type, cfg, params, score.ScoreHead(score_type=score_type))
        tokenizer.save_pretrained(str(root / score_type))
    return root, model, params, tokenizer


def _direct_end_scores(model, params, tokenizer, kind, examples):
    """Each side of every pair scored in one plain forward (no mesh, no batching)."""
    arrays, _ = pipeline.tokenize_examples(kind, examples, tokenizer, max_length=MAX_LENGTH)
    a, b = scores_lib.pair_sides(kind)
    ids = np.concatenate([arrays[f"{a}_input_ids"], arrays[f"{b}_input_ids"]])
    mask = np.concatenate([arrays[f"{a}_attention_mask"], arrays[f"{b}_attention_mask"]])
    end = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask).end_scores[:, 0])
    n = len(examples)
    return end[:n], end[n:], arrays


def _evaluate(root, target, out):
    argv = ["evaluate", target, "--model", str(root / target), "--data", str(root / "mini"), "--out", str(out),
            "--max-length", str(MAX_LENGTH), "--batch-size", "8"]
    assert cli.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_reward(setup, tmp_path):
    root, model, params, tokenizer = setup
    metrics = _evaluate(root, "reward", tmp_path)
    rows, _ = pku_saferlhf.read_release(root / "mini", "default", "test")
    examples = views.preference_examples(rows)
    better, worse, _ = _direct_end_scores(model, params, tokenizer, "preference", examples)
    assert metrics["num_pairs"] == len(examples) == 30  # 3 full batches of 8 and one of 6
    assert metrics["accuracy"] == pytest.approx(np.mean(better > worse))
    all_scores = np.concatenate([better, worse])
    assert metrics["reward_mean"] == pytest.approx(all_scores.mean(), abs=1e-5)
    assert metrics["reward_std"] == pytest.approx(all_scores.std(ddof=1), rel=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), all_scores, atol=1e-5)
    assert (tmp_path / "distribution.png").stat().st_size > 0


def test_evaluate_cost(setup, tmp_path):
    root, model, params, tokenizer = setup
    metrics = _evaluate(root, "cost", tmp_path)
    rows, _ = pku_saferlhf.read_release(root / "mini", "default", "test")
    examples = views.safety_preference_examples(rows, inconsistent="keep")
    safer, unsafer, arrays = _direct_end_scores(model, params, tokenizer, "safety_preference", examples)
    costs = np.concatenate([safer, unsafer])
    signs = np.concatenate([arrays["safer_sign"], arrays["unsafer_sign"]])
    sign_correct = [cost * sign < 0 for cost, sign in zip(costs, signs)]
    assert metrics["accuracy"] == pytest.approx(np.mean(unsafer > safer))
    assert metrics["accuracy_sign"] == pytest.approx(np.mean(sign_correct))
    assert metrics["safe_cost_mean"] == pytest.approx(costs[signs == 1].mean(), abs=1e-5)
    assert metrics["unsafe_cost_mean"] == pytest.approx(costs[signs == -1].mean(), abs=1e-5)
    assert metrics["num_safe"] + metrics["num_unsafe"] == 2 * len(examples)
    np.testing.assert_allclose(np.load(tmp_path / "safe_scores.npy"), costs[signs == 1], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "unsafe_scores.npy"), costs[signs == -1], atol=1e-5)
    for name in ("distribution.png", "safe_distribution.png", "unsafe_distribution.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_evaluate_bad_model_dir(setup, tmp_path):
    root, *_ = setup
    argv = ["evaluate", "reward", "--model", str(tmp_path / "nope"), "--data", str(root / "mini"),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 1


def test_evaluate_on_the_configs_sharded_mesh(setup, tmp_path, monkeypatch, caplog):
    """--config places the model on that config's mesh (fsdp=4 x tensor=2 over the 8 simulated
    devices): the numbers equal the default mesh's, and the parameters really are sharded."""
    from jaxalign.models import loading

    root, *_ = setup
    placed = []
    original = loading.load_score_model

    def spy(*args, **kwargs):
        placed.append(original(*args, **kwargs))
        return placed[-1]

    monkeypatch.setattr(loading, "load_score_model", spy)
    default = _evaluate(root, "reward", tmp_path / "default")
    argv = ["evaluate", "reward", "--model", str(root / "reward"), "--data", str(root / "mini"),
            "--out", str(tmp_path / "sharded"), "--max-length", str(MAX_LENGTH), "--batch-size", "8",
            "--config", "configs/reward_tiny.py", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    assert cli.main(argv) == 0
    sharded = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert sharded["num_pairs"] == default["num_pairs"] and sharded["accuracy"] == default["accuracy"]
    assert sharded["reward_mean"] == pytest.approx(default["reward_mean"], abs=1e-5)
    embedding = placed[-1].params["model"]["embed_tokens"]["embedding"]  # [V, D]: vocab/tensor, embed/fsdp
    assert dict(placed[-1].params["model"]["embed_tokens"]["embedding"].sharding.mesh.shape) == {
        "data": 1, "fsdp": 4, "tensor": 2}
    assert embedding.addressable_shards[0].data.shape == (embedding.shape[0] // 2, embedding.shape[1] // 4)


def test_evaluate_overrides_need_a_config(setup, tmp_path):
    root, *_ = setup
    argv = ["evaluate", "reward", "--model", str(root / "reward"), "--data", str(root / "mini"),
            "--out", str(tmp_path), "--config.mesh.fsdp=4"]
    with pytest.raises(SystemExit):
        cli.main(argv)
