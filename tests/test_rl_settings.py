"""The RL settings groups: config.rl (shared) and config.rl.<algorithm> (each algorithm's own), the
resume of runs written before the split, and the library pieces the RL stage wires (PTX examples,
role-path checks)."""

import json

import pytest

from jaxalign import config as config_lib
from jaxalign import stages
from jaxalign.data.pku_saferlhf import HARM_CATEGORIES
from jaxalign.rl import algorithms, ptx, roles
from jaxalign.rl.algorithms.multi_lag import MultiLagSettings
from jaxalign.rl.algorithms.ppo_lag import PPOLagSettings

# The flat config.rl fields of the algorithms before the split, with upstream scripts/ppo-lag.sh's values.
OLD_BASE = {"threshold": 0.0, "lambda_init": 1.0, "lambda_lr": 0.1, "lambda_max": 5.0, "lambda_update_delay_steps": 0,
            "episode_cost_window_size": 128, "cost_per_token": False, "constraints": ""}


def test_every_algorithm_is_a_stage_with_its_group():
    config = config_lib.load_config("configs/base.py")
    assert set(algorithms.ALGORITHMS) <= set(stages.STAGES)
    assert set(algorithms.config_groups()) == {"ppo_lag", "ppo_reward_shaping", "safe_grpo", "multi_lag", "safe_gspo",
                                               "safe_grpo_k3"}
    for name, group in algorithms.config_groups().items():
        assert config.rl[name].to_dict() == group
        assert name not in algorithms.settings_class(name).__dataclass_fields__  # no clash with a field
    lag = {key: OLD_BASE[key] for key in config.rl.ppo_lag}  # the defaults did not move
    assert config.rl.ppo_lag.to_dict() == lag and config.rl.ppo_reward_shaping.nu == OLD_BASE["lambda_init"]
    assert algorithms.settings_from_group("ppo", config.rl) == algorithms.settings_class("ppo")()
    override = config_lib.load_config("configs/ppo_lag_tiny.py", ["--config.rl.ppo_lag.lambda_lr=0.3"])
    assert algorithms.settings_from_group("ppo_lag", override.rl) == PPOLagSettings(
        lambda_lr=0.3, threshold=-5.5, episode_cost_window_size=32)
    with pytest.raises(config_lib.ConfigError, match="unknown key 'threshold' in rl; valid keys"):
        config_lib.load_config("configs/ppo_lag_tiny.py", ["--config.rl.threshold=1"])
    with pytest.raises(ValueError, match=r"config.rl.ppo_lag: unknown field\(s\) extra"):
        PPOLagSettings.from_group(dict(PPOLagSettings.defaults(), extra=1), "config.rl.ppo_lag")
    with pytest.raises(ValueError, match="config.rl.ppo_lag.episode_cost_window_size must be >= 1"):
        algorithms.make("ppo_lag", True, PPOLagSettings(episode_cost_window_size=0))


def _old_config_json(config, stage_fields: dict) -> dict:
    """config as a run before the split wrote it: no config.rl.<algorithm> groups, the flat fields."""
    saved = json.loads(config_lib.config_to_json(config))
    for name in algorithms.config_groups():
        del saved["rl"][name]
    saved["rl"].update(OLD_BASE, **stage_fields)
    return saved


@pytest.mark.parametrize("name, old_fields, moved", [
    ("ppo_lag_moderation_tiny", dict(threshold=0.05, cost_per_token=True, episode_cost_window_size=32),
     "rl.ppo_lag.threshold: 0.05 -> 0.1"),
    ("multi_lag_tiny", dict(threshold=-5.5, episode_cost_window_size=32, lambda_init=0.5,
                            constraints="severity3<=0.01;lambda_lr=0.5,unsafe<=0.05"),
     "rl.multi_lag.lambda_init: 0.5 -> 0.1"),
    ("ppo_reward_shaping_tiny", dict(threshold=-5.5, episode_cost_window_size=32),
     "rl.ppo_reward_shaping.nu: 1.0 -> 0.1"),
    ("safe_grpo_tiny", dict(threshold=-5.5, episode_cost_window_size=32), "rl.safe_grpo.lambda_init: 1.0 -> 0.1"),
])
def test_a_run_from_before_the_split_resumes_and_its_drift_is_still_refused(tmp_path, name, old_fields, moved):
    """The config.json of an earlier run (flat config.rl fields) against today's config: nothing that
    was read moved in value (only the new groups are listed, as absent before), and a changed moved
    field is refused under its new key."""
    config = config_lib.load_config(f"configs/{name}.py")
    (tmp_path / "config.json").write_text(json.dumps(_old_config_json(config, old_fields)))
    changes = config_lib.check_config_change(tmp_path / "config.json", config)
    assert changes and all(" '<absent>' -> " in change for change in changes), changes
    key = moved.split(":")[0]
    changed = config_lib.load_config(f"configs/{name}.py", [f"--config.{key}=0.1"])
    with pytest.raises(config_lib.ConfigError, match=moved):
        config_lib.check_config_change(tmp_path / "config.json", changed)


def test_ptx_examples_count_what_they_skip_and_refuse_nothing_safe():
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 0,
           "is_response_0_safe": True, "is_response_1_safe": False,
           **{f"response_{i}_harm_category": dict.fromkeys(HARM_CATEGORIES, False) for i in (0, 1)},
           **{f"response_{i}_severity_level": i for i in (0, 1)}}
    unsafe = dict(row, is_response_0_safe=False)
    best = ptx.ptx_examples([row, unsafe], "{input}", "safe_better")
    assert [e["response"] for e in best] == ["a"] and best.counts == {"kept": 1, "skipped_no_safe": 1}
    only = ptx.ptx_examples([row, unsafe], "{input}", "safe_only")
    assert [e["response"] for e in only] == ["a"] and only.counts == {"kept": 1, "skipped_unsafe": 3}
    for response in ("safe_only", "safe_better"):
        with pytest.raises(ValueError, match=f"config.rl.ptx_response='{response}': the PTX data has no response"):
            ptx.ptx_examples([unsafe], "{input}", response)


def test_role_paths_check_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="config.rl.cost_signal='severity3' needs config.rl.cost_model_path to be a "
                                         "moderation export"):
        roles.RolePaths(cost=str(tmp_path), cost_signal="severity3").check()
    with pytest.raises(ValueError, match="config.rl.multi_lag.cost_per_token needs config.rl.cost_model_path"):
        roles.RolePaths(cost=str(tmp_path)).check(("unsafe",), where="config.rl.multi_lag")
    roles.RolePaths(cost=str(tmp_path)).check()  # a plain cost model, read at the end: fine
    assert algorithms.make("multi_lag", True, MultiLagSettings(constraints="cost<=0.1")).moderation_signals == ()
