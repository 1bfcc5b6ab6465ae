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


# --- loading by path: nothing beside a config shadows a library --------------------------------

_SHADOW_SCRIPT = """
import sys
from jaxalign import config as config_lib
assert "grain" not in sys.modules and "optax" not in sys.modules
config = config_lib.load_config({config!r})
assert config.seed == 5 and config.train.learning_rate == 2e-5, config
import grain, optax, json  # the installed ones, not the strays beside the config
for module in (grain, optax, json):
    assert {tmp!r} not in (module.__file__ or ""), module.__file__
print("LOADED-OK")
"""


def _stray(path, name):
    path.write_text(f"raise RuntimeError('stray {name} imported instead of the library')\n")


def test_config_dir_files_do_not_shadow_installed_packages(tmp_path):
    """A shared temp folder: stray grain.py/json.py beside the config and optax.py one level up."""
    import subprocess
    import sys

    folder = tmp_path / "shared"
    folder.mkdir()
    for name in ("grain", "json"):
        _stray(folder / f"{name}.py", name)
    _stray(tmp_path / "optax.py", "optax")
    (folder / "parent_cfg.py").write_text(
        "from configs import base\n\ndef get_config():\n    config = base.get_config()\n    config.seed = 5\n"
        "    return config\n"
    )
    (folder / "my_config.py").write_text("import parent_cfg\n\ndef get_config():\n    return parent_cfg.get_config()\n")
    script = _SHADOW_SCRIPT.format(config=str(folder / "my_config.py"), tmp=str(tmp_path))
    elsewhere = tmp_path / "cwd"  # `python -c` puts the cwd first on sys.path: keep it clean
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "LOADED-OK" in result.stdout, result.stderr[-3000:]


def test_load_config_leaves_sys_path_as_it_was(tmp_path):
    import sys

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "fork.py").write_text(
        "from configs import sft_tiny\n\ndef get_config():\n    return sft_tiny.get_config()\n"
    )
    before = list(sys.path)
    assert config_lib.load_config(tmp_path / "exp" / "fork.py").stage == "sft"
    assert sys.path == before


def test_a_forked_configs_dir_resolves_its_own_siblings(tmp_path):
    """`from configs import x` in tmp/configs/y.py means tmp/configs/x.py, and the repo's configs
    come back for the next repo config."""
    import sys

    saved = {name: module for name, module in sys.modules.items() if name == "configs" or name.startswith("configs.")}
    forked = tmp_path / "configs"
    forked.mkdir()
    (forked / "__init__.py").write_text("")
    (forked / "my_base.py").write_text(
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 11, 'stage': 'sft'})\n"
    )
    (forked / "my_stage.py").write_text(
        "from configs import my_base\n\ndef get_config():\n    config = my_base.get_config()\n"
        "    config.seed += 1\n    return config\n"
    )
    try:
        assert config_lib.load_config(forked / "my_stage.py").seed == 12
        assert config_lib.load_config(BASE.parent / "sft_tiny.py").stage == "sft"  # repo configs again
    finally:
        for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
            del sys.modules[name]
        sys.modules.update(saved)


# --- value checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.train.learning_rate=nan", "train.learning_rate"),
        ("--config.rl.ppo_lag.threshold=inf", "rl.ppo_lag.threshold"),
        ("--config.rl.safe_grpo.lambda_init=-inf", "rl.safe_grpo.lambda_init"),
        ("--config.rl.critic.learning_rate=NaN", "rl.critic.learning_rate"),
    ],
)
def test_non_finite_floats_are_rejected_naming_the_key(override, key):
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{key} is .*finite"):
        config_lib.load_config(BASE, [override])


def test_non_finite_float_in_a_config_file_is_rejected(tmp_path):
    (tmp_path / "bad.py").write_text(
        "from configs import base\n\ndef get_config():\n    config = base.get_config()\n"
        "    config.rl.multi_lag.lambda_lr = float('inf')\n    return config\n"
    )
    with pytest.raises(config_lib.ConfigError, match=r"config\.rl\.multi_lag\.lambda_lr is inf"):
        config_lib.load_config(tmp_path / "bad.py")


@pytest.mark.parametrize(
    "key",
    ["data.batch_size", "train.grad_accum_steps", "data.max_length", "model.hf_config.num_attention_heads"],
)
def test_validate_config_rejects_zero_sizes_naming_the_key(key):
    config = config_lib.load_config(BASE, [f"--config.{key}=0"])
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{key} is 0: expected an int >= 1"):
        config_lib.validate_config(config)


def test_validate_config_accepts_the_shipped_configs_and_checks_heads():
    for name in ("base", "sft_tiny", "reward_tiny", "cost_tiny", "ppo_lag_tiny", "sft_llama2_7b", "ppo_lag_llama2_7b"):
        config_lib.validate_config(config_lib.load_config(BASE.parent / f"{name}.py"))
    config = config_lib.load_config(BASE, ["--config.model.hf_config.num_key_value_heads=5"])
    with pytest.raises(config_lib.ConfigError, match="num_key_value_heads=5 does not divide num_attention_heads=32"):
        config_lib.validate_config(config)
    config = config_lib.load_config(BASE, ["--config.checkpoint.save_every=-1"])
    with pytest.raises(config_lib.ConfigError, match=r"config\.checkpoint\.save_every is -1: expected an int >= 0"):
        config_lib.validate_config(config)


# --- config drift on resume ------------------------------------------------------------------


def test_resume_with_a_changed_batch_size_seed_or_lr_is_refused(tmp_path):
    config_lib.save_config(config_lib.load_config(BASE), tmp_path)
    saved = (tmp_path / "config.json").read_text()
    changed = config_lib.load_config(
        BASE, ["--config.data.batch_size=32", "--config.seed=1", "--config.train.learning_rate=1e-3"]
    )
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_and_save_config(changed, tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "config.json") in message
    for text in ("data.batch_size: 16 -> 32", "seed: 42 -> 1", "train.learning_rate: 2e-05 -> 0.001",
                 "--allow-config-change"):
        assert text in message
    assert (tmp_path / "config.json").read_text() == saved  # the record of the real run survives


def test_allowed_config_change_warns_and_saves(tmp_path, caplog):
    config_lib.save_config(config_lib.load_config(BASE), tmp_path)
    changed = config_lib.load_config(BASE, ["--config.data.batch_size=32"])
    with caplog.at_level("WARNING"):
        changes = config_lib.check_and_save_config(changed, tmp_path, allow_change=True)
    assert changes == ["data.batch_size: 16 -> 32"]
    assert "data.batch_size: 16 -> 32" in caplog.text
    assert '"batch_size": 32' in (tmp_path / "config.json").read_text()


def test_safe_config_changes_resume_without_a_flag(tmp_path):
    config_lib.save_config(config_lib.load_config(BASE), tmp_path)
    longer = config_lib.load_config(
        BASE,
        ["--config.train.num_steps=500", "--config.train.epochs=2", "--config.checkpoint.keep=9",
         "--config.checkpoint.save_every=50", "--config.train.log_every=1", "--config.train.eval_every=20"],
    )
    changes = config_lib.check_config_change(tmp_path / "config.json", longer, allow=False)
    assert "train.num_steps: -1 -> 500" in changes and len(changes) == 6
    assert config_lib.check_config_change(tmp_path / "missing.json", longer, allow=False) == []


def test_unreadable_saved_config_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"seed": 4')
    with pytest.raises(config_lib.ConfigError, match=r"config\.json is not valid JSON"):
        config_lib.check_config_change(tmp_path / "config.json", config_lib.load_config(BASE), allow=False)


def test_a_field_added_to_base_since_the_run_does_not_block_its_resume(tmp_path):
    """A workdir saved before configs/base.py gained a field resumes (the new field is listed as a
    change); a changed existing field is still refused."""
    import json

    config_lib.save_config(config_lib.load_config(BASE), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["rl"]["eval_every"]  # as written by a jaxalign without that field
    (tmp_path / "config.json").write_text(json.dumps(saved))
    changes = config_lib.check_config_change(tmp_path / "config.json", config_lib.load_config(BASE), allow=False)
    assert changes == [f"rl.eval_every: '<absent>' -> {config_lib.load_config(BASE).rl.eval_every!r}"]
    with pytest.raises(config_lib.ConfigError, match=r"seed: 42 -> 7"):
        config_lib.check_config_change(tmp_path / "config.json", config_lib.load_config(BASE, ["--config.seed=7"]),
                                       allow=False)
