"""jaxalign.config: overrides are typed, unknown keys are errors listing the valid keys."""

import pathlib

import pytest

from jaxalign import config as config_lib

BASE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "base.py"


def test_overrides_are_coerced_to_the_field_type():
    config = config_lib.load_config(
        BASE,
        [
            "--config.train.num_steps=7",
            "--config.train.learning_rate=1e-4",
            "--config.checkpoint.async_save=false",
            "--config.data.source",
            "/tmp/data",
            "--config.model.hf_config.tie_word_embeddings=true",
            "--config.mesh.axis_rules=(('batch', 'fsdp'),)",
        ],
    )
    assert config.train.num_steps == 7 and isinstance(config.train.num_steps, int)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.checkpoint.async_save is False
    assert config.data.source == "/tmp/data"
    assert config.model.hf_config.tie_word_embeddings is True
    assert config.mesh.axis_rules == (("batch", "fsdp"),)


def test_typo_is_an_error_listing_valid_keys():
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load_config(BASE, ["--config.train.learning_rat=1e-4"])
    message = str(error.value)
    assert "learning_rat" in message and "learning_rate" in message and "warmup_ratio" in message


def test_bad_value_names_the_field():
    with pytest.raises(config_lib.ConfigError, match="train.num_steps.*int"):
        config_lib.load_config(BASE, ["--config.train.num_steps=abc"])
    with pytest.raises(config_lib.ConfigError, match="is a group"):
        config_lib.load_config(BASE, ["--config.train=3"])


def test_config_is_locked_and_stage_configs_fork_base():
    config = config_lib.load_config(BASE.parent / "sft_tiny.py")
    assert config.stage == "sft"
    with pytest.raises(AttributeError):
        config.train.new_field = 1
    paper = config_lib.load_config(BASE.parent / "sft_llama2_7b.py")
    assert paper.train.epochs == 3 and paper.train.grad_accum_steps == 8
    assert paper.train.learning_rate == pytest.approx(2e-5) and paper.train.warmup_ratio == pytest.approx(0.03)


def test_save_config_writes_json(tmp_path):
    config = config_lib.load_config(BASE, ["--config.seed=3"])
    path = config_lib.save_config(config, tmp_path)
    assert '"seed": 3' in path.read_text()
