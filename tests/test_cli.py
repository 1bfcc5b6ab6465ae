"""The `jaxalign` command: dispatch, and bad input as one clear line with exit code 1."""

import pytest

from jaxalign import cli


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_missing_model_dir_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXALIGN_DEBUG", raising=False)
    missing = tmp_path / "no_such_model"
    assert cli.main(["sample", "--model", str(missing), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "jaxalign sample: error:" in err and str(missing) in err
    assert "Traceback" not in err


def test_debug_env_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXALIGN_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "hi"])


def test_invalid_release_dir_is_reported(tmp_path, capsys):
    (tmp_path / "data" / "Alpaca-7B").mkdir(parents=True)
    (tmp_path / "data" / "Alpaca-7B" / "test.jsonl").write_text('{"prompt": "x"}\n')
    assert cli.main(["data", "validate", str(tmp_path)]) != 0
    captured = capsys.readouterr()
    assert "test.jsonl" in captured.err + captured.out
    assert "'response_0': missing" in captured.err + captured.out  # the nearest kind's missing field


@pytest.mark.parametrize("text", ['{"model_type": "llama", "hidden_size": ', "[1, 2]",
                                  '{"model_type": "llama", "vocab_size": 8, "hidden_size": "abc", '
                                  '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}'])
def test_sample_with_a_malformed_config_json_is_one_line(tmp_path, capsys, monkeypatch, text):
    monkeypatch.delenv("JAXALIGN_DEBUG", raising=False)
    (tmp_path / "config.json").write_text(text)
    assert cli.main(["sample", "--model", str(tmp_path), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxalign sample: error:") and "config.json" in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A 150-row mini dataset and its BPE tokenizer."""
    from jaxalign.data import mini
    from jaxalign.models import tokenizer as tokenizer_lib

    root = tmp_path_factory.mktemp("mini")
    mini.write_mini(root / "data", rows=150, seed=0)
    tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tokenizer")
    return root


def _sft_argv(root, workdir):
    return ["train", "--config", "configs/sft_tiny.py", "--workdir", str(workdir),
            f"--config.data.source={root / 'data'}", f"--config.tokenizer={root / 'tokenizer'}",
            "--config.train.num_steps=2", "--config.data.max_length=48", "--config.data.batch_size=8",
            "--config.data.eval_split=", "--config.checkpoint.save_every=1", "--config.checkpoint.async_save=False"]


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_a_full_disk_is_one_line(mini_run, tmp_path, capsys, monkeypatch, where):
    """ENOSPC while saving a checkpoint (Orbax) or writing the export (safetensors): exit 1 and one
    line naming the full disk, no traceback."""
    import errno

    import orbax.checkpoint as ocp

    from jaxalign.models import hf

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run"))

    if where == "checkpoint":
        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    else:
        monkeypatch.setattr(hf, "save_file", full)
    monkeypatch.delenv("JAXALIGN_DEBUG", raising=False)
    assert cli.main(_sft_argv(mini_run, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert "Traceback" not in err


def test_python_dash_m_is_the_same_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "jaxalign", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout


def test_config_overrides_need_a_command_that_takes_a_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "stats", str(tmp_path), "--config.train.num_steps=3"])
    assert "unrecognized arguments: --config.train.num_steps=3" in capsys.readouterr().err


def test_a_bad_override_of_train_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXALIGN_DEBUG", raising=False)
    argv = ["train", "--config", "configs/sft_tiny.py", "--workdir", str(tmp_path / "run"), "--config.train.nmu_steps=3"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxalign train: error:") and "nmu_steps" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_host_without_tpu_chips_runs_on_the_cpu_quietly(monkeypatch):
    """libtpu installed (the tpu extra) but no TPU chip: JAX is pinned to the CPU instead of starting
    the TPU runtime; an explicit JAX_PLATFORMS is kept; a host with TPU chips is left alone."""
    import importlib.util

    from jax._src import hardware_utils

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else
                        (None if name == "jax_plugins" else real_find_spec(name, *a)))
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    cli.skip_absent_tpu()
    assert cli.os.environ["JAX_PLATFORMS"] == "cpu"

    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    cli.skip_absent_tpu()
    assert cli.os.environ["JAX_PLATFORMS"] == "tpu,cpu"

    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, 5))
    cli.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in cli.os.environ
