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
