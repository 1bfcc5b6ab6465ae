"""RL training curves: series, smoothing and the first/last summary against direct numpy; CLI files."""

import json

import numpy as np
import pytest

from jaxalign import cli
from jaxalign.evaluate import curves


def _write_run(workdir, rewards, costs, lambdas):
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for step, (r, c, lam) in enumerate(zip(rewards, costs, lambdas), start=1):
            f.write(json.dumps({"step": step, "reward": r, "cost": c, "lambda": lam, "kl_divergence": 0.1}) + "\n")


def test_moving_average_matches_direct_trailing_mean():
    values = np.array([1.0, 5.0, 2.0, 8.0, 3.0])
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(curves.moving_average(values, 3), expected)
    np.testing.assert_allclose(curves.moving_average(values, 1), values)


def test_summary_first_and_last_windows(tmp_path):
    rng = np.random.default_rng(0)
    rewards, costs = rng.normal(size=30), rng.normal(size=30)
    lambdas = np.linspace(1.0, 4.0, 30)
    _write_run(tmp_path / "run", rewards, costs, lambdas)
    summary = curves.summarize(curves.load_runs([str(tmp_path / "run")])["run"], window=5)
    assert summary["iterations"] == 30
    np.testing.assert_allclose(summary["reward_first"], rewards[:5].mean())
    np.testing.assert_allclose(summary["cost_last"], costs[-5:].mean())
    np.testing.assert_allclose(summary["lambda_max"], 4.0)
    np.testing.assert_allclose(summary["lambda_last"], 4.0)


def test_cli_writes_png_and_summary(tmp_path, capsys):
    _write_run(tmp_path / "lag", [0.0] * 12, [1.0] * 6 + [-1.0] * 6, [1.0] * 12)
    _write_run(tmp_path / "ppo", [1.0] * 12, [2.0] * 12, [0.0] * 12)
    out = tmp_path / "plots" / "curves.png"
    rc = cli.main(["evaluate", "curves", "--runs", str(tmp_path / "lag"), str(tmp_path / "ppo"),
                   "--labels", "PPO-Lagrangian", "PPO", "--threshold", "0", "--smooth", "3", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["PPO-Lagrangian"]["cost_first"] == pytest.approx(1.0)
    assert summary["PPO-Lagrangian"]["cost_last"] == pytest.approx(-1.0)
    assert summary["PPO"]["reward_last"] == pytest.approx(1.0)


def test_missing_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/metrics.jsonl"):
        curves.load_runs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        curves.load_runs([str(tmp_path / "empty")], ["a", "b"])
