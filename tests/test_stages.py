"""The stages end to end on a second model family: a random Qwen3 policy through SFT, reward,
cost and PPO-Lagrangian with `jaxalign train`, each stage reading the previous one's export."""

import json
import pathlib

import numpy as np
import pytest

from jaxalign import cli, stages
from jaxalign.models import hf, score
from jaxalign.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _train(config, workdir, *overrides):
    argv = ["train", "--config", str(REPO / "configs" / config), "--workdir", str(workdir), *overrides]
    assert cli.main(argv) == 0, argv
    return metrics_lib.read_metrics(workdir)


def test_ppo_lagrangian_pipeline_on_a_qwen3_backbone(mini_data, tmp_path):
    data = [f"--config.data.source={mini_data / 'data'}", "--config.data.max_length=64",
            "--config.data.eval_split=", "--config.checkpoint.save_every=0"]
    qwen = ["--config.model.hf_config.model_type=qwen3", "--config.model.hf_config.head_dim=16"]
    sft = _train("sft_tiny.py", tmp_path / "sft", f"--config.tokenizer={mini_data / 'tokenizer'}",
                 "--config.train.num_steps=3", *qwen, *data)
    assert len(sft) >= 1 and np.isfinite(sft[-1]["loss"])
    assert hf.read_config(tmp_path / "sft" / "export")["model_type"] == "qwen3"
    for kind in ("reward", "cost"):
        _train(f"{kind}_tiny.py", tmp_path / kind, f"--config.model.init_path={tmp_path / 'sft' / 'export'}",
               f"--config.tokenizer={tmp_path / 'sft' / 'export'}", "--config.train.num_steps=2", *data)
        cfg, head, _, _ = score.load_score_model(tmp_path / kind / "export")
        assert cfg.model_type == "qwen3" and cfg.attention_options.qk_norm and head.score_type == kind
    records = _train(
        "ppo_lag_tiny.py", tmp_path / "ppo_lag", f"--config.model.init_path={tmp_path / 'sft' / 'export'}",
        f"--config.rl.reward_model_path={tmp_path / 'reward' / 'export'}",
        f"--config.rl.cost_model_path={tmp_path / 'cost' / 'export'}", "--config.rl.prompt_length=40",
        "--config.rl.max_new_tokens=8", "--config.data.batch_size=8", "--config.train.num_steps=2", *data)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward", "cost", "lambda", "episode_cost", "reward_critic_loss", "cost_critic_loss", "ptx_loss"):
        assert np.isfinite(records[-1][key]), key
    exported = hf.read_config(tmp_path / "ppo_lag" / "export")
    assert exported["model_type"] == "qwen3" and exported["architectures"] == ["Qwen3ForCausalLM"]
    assert json.loads((tmp_path / "ppo_lag" / "config.json").read_text())["stage"] == "ppo_lag"


def test_every_stage_module_has_a_run_and_unknown_stages_are_refused():
    for name in stages.STAGES:
        assert callable(stages.stage_module(name).run), name
    with pytest.raises(ValueError, match="config.stage: unknown stage 'dpo2'"):
        stages.stage_module("dpo2")


def test_no_library_module_imports_a_stage_or_reads_a_config_dict():
    """The layering rule: only jaxalign/stages (and the CLI) read ConfigDicts or import stages."""
    library = ["models", "data", "objectives", "generate", "rl", "evaluate", "train", "parallel"]
    offenders = []
    for package in library:
        for path in (REPO / "jaxalign" / package).rglob("*.py"):
            text = path.read_text()
            if "jaxalign.stages" in text or "from jaxalign import stages" in text or "import ml_collections" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders
