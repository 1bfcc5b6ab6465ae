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


# Library packages: typed settings in, never a ConfigDict, a stage or a command (a `commands`
# module may import another one: commands are the CLI layer, see jaxalign/cli.py).
LIBRARY = ["models", "data", "objectives", "generate", "rl", "evaluate", "train", "parallel", "moderation", "plan"]
# What a library module may use of jaxalign.config: functions that return typed settings.
TYPED_CONFIG_FUNCTIONS = {"mesh_settings", "ConfigError"}
CONFIG_DICT_NAMES = {"ConfigDict", "FrozenConfigDict", "FieldReference", "config_dict"}


def _layering_offences(path: pathlib.Path, config_groups: set[str], root: pathlib.Path = REPO) -> list[str]:
    """Why `path` (a module of a library package) breaks the layering rule: each offence with its line."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    is_command = path.stem == "commands"
    config_aliases, offences = set(), []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            base = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            names = [(f"{base}.{a.name}" if base else a.name, a.asname or a.name) for a in node.names]
            for full, bound in names:
                if full.startswith("jaxalign.stages") or full.startswith("ml_collections") or base.startswith(
                        "ml_collections"):
                    offences.append(f"{where}: imports {full}")
                elif full.split(".")[-1] == "commands" or ".commands." in f"{full}.":
                    if not is_command:
                        offences.append(f"{where}: imports the command module {full}")
                elif full == "jaxalign.config":
                    config_aliases.add(bound)
                elif base == "jaxalign.config" and full.split(".")[-1] not in TYPED_CONFIG_FUNCTIONS:
                    offences.append(f"{where}: uses jaxalign.config.{full.split('.')[-1]} (reads a ConfigDict)")
        elif isinstance(node, ast.Name) and node.id in CONFIG_DICT_NAMES:
            offences.append(f"{where}: names {node.id}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in CONFIG_DICT_NAMES:
                offences.append(f"{where}: uses {node.value.id}.{node.attr}")
            elif node.value.id in config_aliases and node.attr not in TYPED_CONFIG_FUNCTIONS:
                offences.append(f"{where}: uses jaxalign.config.{node.attr} (reads a ConfigDict)")
            elif node.value.id == "config" and node.attr in config_groups:
                offences.append(f"{where}: reads config.{node.attr} (a ConfigDict field)")
    return offences


def test_no_library_module_imports_a_stage_or_a_command_or_reads_a_config_dict():
    """The layering rule: only jaxalign/stages (and the CLI) read ConfigDicts or import stages;
    library modules never import a `commands` module."""
    from jaxalign import config as config_lib

    groups = set(config_lib.load_config_file(REPO / "configs" / "base.py").keys())
    offences = [offence for package in LIBRARY for path in sorted((REPO / "jaxalign" / package).rglob("*.py"))
                for offence in _layering_offences(path, groups)]
    assert not offences, "\n".join(offences)


def test_the_layering_check_finds_each_kind_of_offence(tmp_path):
    """Each way of breaking the rule is reported (the check above cannot pass vacuously)."""
    module = tmp_path / "probe.py"
    lines = ["import ml_collections", "from jaxalign.evaluate import commands",
             "from jaxalign.evaluate.commands import mesh_from_args", "from jaxalign import config as config_lib",
             "from jaxalign.stages import common", "x = config_lib.load_config('c.py')", "y = config.mesh.fsdp",
             "z = ml_collections.ConfigDict()", "ok = config_lib.mesh_settings('')", "fine = config.get('x')"]
    module.write_text("\n".join(lines) + "\n")
    offences = _layering_offences(module, {"mesh", "rl"}, root=tmp_path)
    assert [int(o.split(":")[1]) for o in offences if not o.endswith("ConfigDict")] == [1, 2, 3, 5, 6, 7]
    assert any("names ConfigDict" in o or "uses ml_collections.ConfigDict" in o for o in offences)
    assert not [o for o in offences if ":9:" in o or ":10:" in o]
