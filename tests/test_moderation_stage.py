"""Moderation end to end on the mini dataset: the stage learns well above chance, the
export reloads with its validation threshold, `jaxalign evaluate moderation` and `jaxalign
moderate` (generated files, release rows, ../shared/data/pku_saferlhf_head, malformed lines)."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from jaxalign import cli
from jaxalign import config as config_lib
from jaxalign.data import mini
from jaxalign.models import hf, llama
from jaxalign.models import moderation as mm
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.moderation import api
from jaxalign.stages import commands

from test_score_stage import _host_llama_params

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A moderation run of STEPS updates on 600 mini rows from a random tiny "SFT" Llama."""
    root = tmp_path_factory.mktemp("moderation")
    mini.write_mini(root / "mini", rows=600)
    tokenizer = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "mini"), 384, root / "tok")
    cfg = llama.LlamaConfig.from_hf_config(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=128, vocab_size=len(tokenizer)))
    hf.save_pretrained(root / "sft", cfg, _host_llama_params(cfg))
    overrides = {"model.init_path": root / "sft", "tokenizer": root / "tok", "data.source": root / "mini",
                 "data.max_length": 48, "model.hf_config.hidden_size": 32, "model.hf_config.intermediate_size": 64,
                 "train.num_steps": STEPS, "train.learning_rate": 3e-3, "train.log_every": 10, "train.eval_every": 0,
                 "data.batch_size": 16, "data.eval_batch_size": 16, "checkpoint.save_every": 1000,
                 "checkpoint.async_save": False}
    config = config_lib.load_config(REPO / "configs" / "moderation_tiny.py",
                                    [f"--config.{k}={v}" for k, v in overrides.items()])
    result = commands.train(config, root / "run")
    return root, config, result


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_stage_learns_and_exports(trained):
    root, config, result = trained
    records = _records(root / "run")
    train = [r for r in records if "loss" in r]
    assert train[-1]["step"] == STEPS and {"stream_loss", "category_loss", "severity_loss"} <= set(train[-1])
    assert np.mean([r["loss"] for r in train[-2:]]) < train[0]["loss"]
    final = [r for r in records if "eval/unsafe_f1" in r][-1]
    # mini test split: ~45% of the answers are unsafe; chance F1 (all unsafe) is ~0.6, accuracy ~0.55
    assert final["eval/unsafe_auroc"] > 0.9 and final["eval/unsafe_accuracy"] > 0.8
    cfg, head, _ = mm.load_moderation_model(root / "run" / "export")
    assert 0.0 < head.threshold < 1.0  # chosen on the held-out rows
    assert head.max_length == 48 and "{input}" in head.prompt_template
    assert len(head.category_thresholds) == 19  # each chosen on the held-out rows
    # a finished run re-runs as a no-op and keeps its export
    assert commands.train(config, root / "run").trained_steps == 0


def test_evaluate_command_report(trained, capsys):
    root, _, _ = trained
    out = root / "eval"
    assert cli.main(["evaluate", "moderation", "--model", str(root / "run" / "export"), "--data", str(root / "mini"),
                     "--out", str(out)]) == 0
    headline = json.loads(capsys.readouterr().out)
    report = json.loads((out / "metrics.json").read_text())
    assert {"roc_curve.png", "pr_curve.png", "metrics.json", "scores.npz"} <= {p.name for p in out.iterdir()}
    scores = dict(np.load(out / "scores.npz"))
    n = report["examples"]
    assert n == 120  # 60 test rows x 2 answers
    assert headline["unsafe_f1"] == pytest.approx(report["unsafe"]["f1"])
    assert report["unsafe"]["f1"] > 0.8
    assert len(report["categories"]["per_category"]) == 19 and len(report["severity"]["confusion"]) == 4
    assert sum(map(sum, report["severity"]["confusion"])) == n
    assert {"first_flag_token_mean", "false_alarm_rate"} <= set(report["streaming"])
    flagged = (scores["unsafe"] >= report["threshold"]).sum()
    assert report["unsafe"]["tp"] + report["unsafe"]["fp"] == flagged


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_moderate_command_and_api(trained, capsys):
    root, _, _ = trained
    export = root / "run" / "export"
    release = (root / "mini" / "data" / "Alpaca-7B" / "test.jsonl").read_text().splitlines()[:3]
    pairs = [{"prompt": "How do I bake bread?", "response": "Sure! Mix flour, water, yeast and salt.", "id": 1},
             {"prompt": "How can I hurt my neighbor?",
              "response": "Sure. Get a gun, follow your neighbor home and shoot them.", "id": 2}]
    source = _write_lines(root / "in.jsonl", [json.dumps(p) for p in pairs] + release)
    assert cli.main(["moderate", "--model", str(export), "--input", str(source), "--batch-size", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 2 + 2 * 3 and summary["malformed_lines"] == 0 and summary["rows_per_second"] > 0
    rows = [json.loads(line) for line in (root / "in.moderated.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    head = mm.load_moderation_model(export)[1]
    for row in rows:
        assert set(row["categories"]) == set(head.category_names)
        assert row["is_safe"] == (row["unsafe_probability"] < head.threshold)
        assert (row["severity"] == 0) == row["is_safe"] and bool(row["flagged_categories"]) == (not row["is_safe"])
    assert rows[0]["id"] == 1 and rows[1]["id"] == 2
    assert [r["response_index"] for r in rows[2:]] == [0, 1] * 3
    first = json.loads(release[0])
    assert rows[2]["response"] == first["response_0"] and rows[3]["response"] == first["response_1"]
    assert rows[2]["is_response_0_safe"] == first["is_response_0_safe"]  # input fields kept
    # the Python API gives the same results
    results = api.moderate([(p["prompt"], p["response"]) for p in pairs], export, batch_size=8)
    for result, row in zip(results, rows[:2]):
        assert result["unsafe_probability"] == pytest.approx(row["unsafe_probability"], abs=1e-5)
        assert result["severity"] == row["severity"]
    assert rows[1]["is_safe"] is False and rows[0]["is_safe"] is True  # the learnt model on clear cases


def test_moderate_malformed_lines(trained, capsys):
    root, _, _ = trained
    export = root / "run" / "export"
    good = json.dumps({"prompt": "How do I bake bread?", "response": "Mix flour and water."})
    lines = [good, "{not json", "[1, 2]", json.dumps({"prompt": "only a prompt"}), "",
             json.dumps({"prompt": 3, "response": "x"}), json.dumps({"prompt": "p", "response_0": "a"}), good]
    source = _write_lines(root / "bad.jsonl", lines)
    source.write_bytes(source.read_bytes() + b'{"prompt": "\xff", "response": "x"}\n')  # line 9: not UTF-8
    out = root / "bad_out.jsonl"
    assert cli.main(["moderate", "--model", str(export), "--input", str(source), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["rows"] == 2 and summary["malformed_lines"] == 6
    assert len(out.read_text().splitlines()) == 2
    assert "bad.jsonl:9: not UTF-8" in captured.err
    for number in (2, 3, 4, 6, 7, 9):  # each skipped line is logged with its number
        assert f"bad.jsonl:{number}:" in captured.err
    out.unlink()
    assert cli.main(["moderate", "--model", str(export), "--input", str(source), "--output", str(out),
                     "--on-error", "stop"]) == 1
    error = capsys.readouterr().err
    assert "bad.jsonl:2: not valid JSON" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()
    assert cli.main(["moderate", "--model", str(export), "--input", str(root / "missing.jsonl")]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    assert cli.main(["moderate", "--model", str(root / "sft"), "--tokenizer", str(root / "tok"),
                     "--input", str(source)]) == 1
    assert "not a moderation model" in capsys.readouterr().err


def test_moderate_real_release_rows(trained, shared_head_dir, capsys):
    root, _, _ = trained
    source = shared_head_dir / "data" / "Alpaca-7B" / "test.jsonl"
    n = sum(1 for line in source.read_text().splitlines() if line.strip())
    out = root / "head.jsonl"
    assert cli.main(["moderate", "--model", str(root / "run" / "export"), "--input", str(source), "--output", str(out),
                     "--batch-size", "32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 2 * n and summary["malformed_lines"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * n and all(0.0 <= r["unsafe_probability"] <= 1.0 for r in rows)


def test_stage_resumes_exactly(trained, tmp_path):
    """A run cut back to its step-4 checkpoint and re-run logs the same losses bitwise and exports
    the same model and thresholds."""
    root, config, _ = trained
    config = config_lib.load_config(REPO / "configs" / "moderation_tiny.py", [
        f"--config.model.init_path={root / 'sft'}", f"--config.tokenizer={root / 'tok'}",
        f"--config.data.source={root / 'mini'}", "--config.data.max_length=32", "--config.data.batch_size=8",
        "--config.data.eval_split=", "--config.train.num_steps=6", "--config.train.log_every=1",
        "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False"])
    full = tmp_path / "full"
    commands.train(config, full)
    losses = [(r["step"], r["loss"]) for r in _records(full) if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for path in (resumed / "export", resumed / "checkpoints" / "6"):
        shutil.rmtree(path)
    assert commands.train(config, resumed).trained_steps == 2
    assert [(r["step"], r["loss"]) for r in _records(resumed) if "loss" in r] == losses
    _, head_a, params_a = mm.load_moderation_model(full / "export")
    _, head_b, params_b = mm.load_moderation_model(resumed / "export")
    assert head_a == head_b
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)


def test_bad_validation_fraction_is_one_clear_error(trained, tmp_path):
    root, _, _ = trained
    config = config_lib.load_config(REPO / "configs" / "moderation_tiny.py", [
        f"--config.model.init_path={root / 'sft'}", f"--config.tokenizer={root / 'tok'}",
        f"--config.data.source={root / 'mini'}", "--config.moderation.validation_fraction=0.0"])
    with pytest.raises(ValueError, match="config.moderation.validation_fraction=0.0 holds out 0 of the 540"):
        commands.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
