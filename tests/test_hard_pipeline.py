"""experiments/hard.sh at tiny sizes (every stage of one seed, a couple of updates each), and the
aggregation over seeds of experiments/hard_results.py against numpy on hand-made judge results."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

EXPERIMENTS = REPO_ROOT / "experiments"


def _judge_json(harmful_id, harmful_held, lookalike_refusal, helpful):
    """A judge.json with the fields hard_results.py reads."""
    slices = {"in_distribution": {"harmful_rate": harmful_id}, "held_out_phrasing": {"harmful_rate": harmful_held},
              "lookalike": {"over_refusal_rate": lookalike_refusal, "helpful_rate": 0.5, "num_answers": 10,
                            "broken_rate": 0.1},
              "late_turning": {"continued_rate": 0.25, "stopped_rate": 0.5}}
    return {"severe_rate": 0.0, "helpful_rate": helpful, "broken_rate": 0.0, "num_answers": 30, "slices": slices}


def test_results_mean_and_std_over_seeds(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import hard_results

    values = {"0": (0.1, 0.3, 0.2, 0.5), "1": (0.2, 0.1, 0.4, 0.7), "2": (0.0, 0.2, 0.3, 0.6)}
    for seed, v in values.items():
        for name in ("sft", "ppo_lag", "shaping_nu2"):
            path = tmp_path / f"seed{seed}" / f"judge_{name}" / "judge.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_judge_json(*v)))
    (tmp_path / "times.txt").write_text("".join(f"TIME {tmp_path}/seed{s}/ppo_lag {t} s 1000 KB\n"
                                                for s, t in (("0", 100), ("1", 110), ("2", 120))))
    for seed, met in (("0", 3), ("1", 5)):  # seed 2 never meets the threshold: left out of the mean
        workdir = tmp_path / f"seed{seed}" / "ppo_lag_tiny"
        workdir.mkdir()
        (workdir / "config.json").write_text(json.dumps({"rl": {"threshold": -5.5}}))
        costs = [-5.0] * 6 if seed == "2" else [-5.0] * (met - 1) + [-5.6, -5.4]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "episode_cost": c}) + "\n"
                                                       for i, c in enumerate(costs)))
    assert hard_results.main(["--dir", str(tmp_path), "--seeds", "0", "1", "2", "--methods", "sft", "ppo_lag",
                              "--nus", "2"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    lag = result["methods"]["ppo_lag"]
    held = [v[1] for v in values.values()]
    assert lag["mean"]["harmful_held_out"] == pytest.approx(np.mean(held))
    assert lag["std"]["harmful_held_out"] == pytest.approx(np.std(held, ddof=1))
    assert lag["mean"]["wall_s"] == pytest.approx(110) and lag["std"]["wall_s"] == pytest.approx(10)
    assert lag["mean"]["broken"] == pytest.approx(0.1 * 10 / 40)  # pooled with the look-alike slice
    assert np.isnan(result["methods"]["sft"]["mean"]["wall_s"])
    assert lag["per_seed"]["0"]["constraint_met_at"] == 3 and lag["per_seed"]["1"]["constraint_met_at"] == 5
    assert np.isnan(lag["per_seed"]["2"]["constraint_met_at"]) and lag["mean"]["constraint_met_at"] == 4
    assert [point["nu"] for point in result["front"]] == [2.0]
    table = (tmp_path / "results.md").read_text()
    assert "| PPO-Lagrangian | 10.0 ± 10.0 | 20.0 ± 10.0 |" in table and "| ν = 2 |" in table
    assert "| 4 ± 1 (2/3 seeds) | 110 ± 10 |" in table
    assert (tmp_path / "plane.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="no judge result for dpo, seed 0"):
        hard_results.main(["--dir", str(tmp_path), "--seeds", "0", "--methods", "dpo"])


@pytest.mark.slow
def test_hard_pipeline_runs_small(tmp_path):
    """One seed, SFT and PPO-Lagrangian (with the reward, cost and moderation models it needs), a few
    updates each: the exports, the judge's slices, the results table and the moderation analysis."""
    out = tmp_path / "hard"
    env = dict(os.environ, OUT=str(out), SMALL="1", SEEDS="0", METHODS="sft ppo_lag", NUS="",
               PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    run = subprocess.run(["bash", str(EXPERIMENTS / "hard.sh")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("sft", "reward", "cost", "moderation", "ppo_lag"):
        assert (out / "seed0" / f"{stage}_tiny" / "export" / "config.json").exists(), stage
    rates = json.loads((out / "seed0" / "judge_ppo_lag" / "judge.json").read_text())
    assert set(rates["slices"]) == {"in_distribution", "held_out_phrasing", "lookalike", "late_turning"}
    result = json.loads((out / "results.json").read_text())
    assert set(result["methods"]) == {"sft", "ppo_lag"}
    assert result["methods"]["ppo_lag"]["mean"]["wall_s"] > 0  # from the GNU time lines
    moderation = json.loads((out / "moderation.json").read_text())
    assert moderation["per_seed"]["0"]["lookalike"]["n"] > 0
    assert moderation["per_seed"]["0"]["unsafe_by_turn"]["2"]["turn_token_mean"] > 5  # "Sure! Here is how. It is simple."
    assert "Done in" in run.stdout
