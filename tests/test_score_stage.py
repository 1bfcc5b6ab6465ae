"""Reward/cost stage end to end on the mini dataset: accuracy rises, stats tracked, export reloads."""

import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.data import mini
from jaxalign.models import hf, llama, score
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.models import loading
from jaxalign.objectives import preference
from jaxalign.stages import commands, common
from jaxalign.stages import score as score_stage
from jaxalign.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 25


def _host_llama_params(cfg, seed=0):
    """HF-like random Llama params in numpy (N(0, 0.02), norms 1), without compiling an init."""
    ids = np.zeros((1, 1), np.int32)
    shapes = nn.meta.unbox(jax.eval_shape(llama.Llama(cfg).init, jax.random.PRNGKey(0), ids)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(x.shape, np.float32)
        return (0.02 * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    """Mini dataset, BPE tokenizer and a random tiny "SFT" Llama dir to start the score models from."""
    root = tmp_path_factory.mktemp("score_data")
    mini.write_mini(root / "mini", rows=600)
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "mini"), 384, root / "tok")
    config = _config("reward", root)
    sft_cfg = llama.LlamaConfig.from_hf_config(dict(config.model.hf_config.to_dict(), vocab_size=len(tokenizer)))
    hf.save_pretrained(root / "sft", sft_cfg, _host_llama_params(sft_cfg))
    return root


def _config(stage, data, **extra):
    overrides = {
        "model.init_path": str(data / "sft"),
        "tokenizer": str(data / "tok"),
        "data.source": str(data / "mini"),
        "data.max_length": 48,
        "model.hf_config.hidden_size": 32,
        "model.hf_config.intermediate_size": 64,
        "train.num_steps": STEPS,
        "train.log_every": 1,
        "train.eval_every": 0,
        "checkpoint.save_every": 1000,
        "checkpoint.async_save": False,
        **extra,
    }
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return config_lib.load_config(REPO / "configs" / f"{stage}_tiny.py", args)


def _metrics(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "accuracy" in m]
    evals = [m for m in lines if "eval/accuracy" in m]
    return train, evals


def _check_export(export, stage, steps, batch_size):
    cfg, head, _, stats = score.load_score_model(export)
    assert head.score_type == stage and head.normalizer_type == "ExponentialMovingAverage"
    assert int(stats["count"]) == steps * 2 * batch_size  # every end score of every step
    assert float(stats["var"][0]) != 1.0  # moved away from the initial statistics
    assert (export / "tokenizer.json").exists()
    return cfg


def test_reward_stage_learns_preferences(mini_data, tmp_path):
    # No eval split here (saves a compile): the cost test covers the stage's evaluation.
    config = _config("reward", mini_data, **{"data.eval_split": ""})
    commands.train(config, tmp_path)
    export = tmp_path / "export"
    train, evals = _metrics(tmp_path)
    assert len(train) == STEPS and not evals
    early = np.mean([m["accuracy"] for m in train[:3]])
    late = np.mean([m["accuracy"] for m in train[-10:]])
    assert late > 0.75 and late > early, [m["accuracy"] for m in train]
    assert train[-1]["loss"] < train[0]["loss"]
    _check_export(export, "reward", STEPS, 16)


def test_cost_stage_learns_signs(mini_data, tmp_path):
    config = _config("cost", mini_data)
    commands.train(config, tmp_path)
    export = tmp_path / "export"
    train, evals = _metrics(tmp_path)
    early = np.mean([m["accuracy_sign"] for m in train[:3]])
    late = np.mean([m["accuracy_sign"] for m in train[-10:]])
    assert late > 0.8 and late > early, [m["accuracy_sign"] for m in train]
    assert len(evals) == 1 and evals[-1]["eval/num_pairs"] == 60 - 2  # 2 inconsistent test pairs skipped
    assert evals[-1]["eval/accuracy_sign"] > 0.8
    assert evals[-1]["eval/unsafe_cost_mean"] > evals[-1]["eval/safe_cost_mean"]
    _check_export(export, "cost", STEPS, 16)


def test_init_from_llama_dir_copies_backbone_and_grows_vocab(mini_data, tmp_path):
    config = _config("reward", mini_data, **{"model.init_path": str(tmp_path / "sft")})
    tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer)
    small_vocab = len(tokenizer) - 2  # the tokenizer "added" two tokens since the SFT export
    sft_cfg = llama.LlamaConfig.from_hf_config(dict(config.model.hf_config.to_dict(), vocab_size=small_vocab))
    sft_params = _host_llama_params(sft_cfg, seed=1)
    hf.save_pretrained(tmp_path / "sft", sft_cfg, sft_params)

    head = score_stage.score_head(config)
    mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.axis_rules(config.mesh)
    state = loading.load_backbone_with_head(common.model_settings(config), head, mesh, rules,
                                            vocab_size=len(tokenizer), special=loading.special_ids(tokenizer),
                                            rng=jax.random.PRNGKey(0))
    cfg = state.cfg
    assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == tokenizer.pad_token_id
    assert state.shardings["model"]["embed_tokens"]["embedding"] == state.params["model"]["embed_tokens"][
        "embedding"].sharding

    embedding = np.asarray(state.params["model"]["embed_tokens"]["embedding"])
    old = sft_params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(embedding[:small_vocab], old)
    np.testing.assert_allclose(embedding[small_vocab:], np.broadcast_to(old.mean(0), (2, old.shape[1])), rtol=1e-5)
    up_proj = lambda p: p["model"]["layers"]["mlp"]["up_proj"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(up_proj(state.params), up_proj(sft_params))
    np.testing.assert_array_equal(state.params["score_head"]["bias"], [0.0])
    assert 0.005 < float(np.std(state.params["score_head"]["kernel"])) < 0.05  # N(0, 0.02), fresh
    assert int(state.stats["count"]) == 0


def test_bad_stage_and_loss_type(mini_data):
    config = _config("reward", mini_data)
    with config.unlocked():
        config.stage = "sft"
    with pytest.raises(ValueError, match="stages"):
        score_stage.score_head(config)
    config = _config("reward", mini_data, **{"score.loss_type": "pairwise"})
    head = score_stage.score_head(config)
    with pytest.raises(ValueError, match="config.score.loss_type: 'pairwise'"):
        preference.make_score_loss_fn(None, head, "preference", config.score.loss_type, 0.0)
