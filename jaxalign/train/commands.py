"""`jaxalign train --config configs/<file>.py --workdir DIR [--config.a.b=v ...]`.

Loads the config (overrides applied, unknown keys rejected), initialises multi-host JAX when
`config.mesh.distributed` is set, writes WORKDIR/config.json and dispatches on `config.stage`
to the stage runner's `run(config, workdir)`. Re-running the same command resumes from the
latest checkpoint in WORKDIR.
"""

from __future__ import annotations

import importlib
import sys
import json
import logging
import pathlib

import jax

from jaxalign import config as config_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import workdir as workdir_lib

ACCEPTS_EXTRA_ARGS = True  # jaxalign/cli.py passes the --config.* overrides as args.extra_args

# config.stage -> module exposing run(config, workdir)
STAGES = {
    "sft": "jaxalign.train.sft_stage",
    "reward": "jaxalign.train.score_stage",
    "cost": "jaxalign.train.score_stage",
    "ppo": "jaxalign.rl.ppo_lag",
    "ppo_lag": "jaxalign.rl.ppo_lag",
    "ppo_reward_shaping": "jaxalign.rl.ppo_lag",
}


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config(), e.g. configs/sft_tiny.py")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, export/")


def train(config, workdir: str | pathlib.Path):
    """Runs the stage named by `config.stage` in `workdir` and returns what its run() returns."""
    if config.stage not in STAGES:
        raise config_lib.ConfigError(f"config.stage: unknown stage {config.stage!r}; valid: {', '.join(STAGES)}")
    mesh_lib.maybe_initialize_distributed(config.mesh)
    workdir = pathlib.Path(workdir)
    # One run per workdir (WorkdirLockedError naming the holder's pid otherwise); process 0 holds it.
    with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
        if jax.process_index() == 0:
            _warn_on_config_change(config, workdir / "config.json")
            config_lib.save_config(config, workdir)
        module = importlib.import_module(STAGES[config.stage])
        return module.run(config, workdir)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        items = {}
        for key, value in tree.items():
            items.update(_flatten(value, f"{prefix}{key}."))
        return items
    return {prefix[:-1]: tree}


def _warn_on_config_change(config, path: pathlib.Path) -> None:
    """Resuming with a different config is allowed (e.g. more steps) but logged field by field."""
    if not path.exists():
        return
    old = _flatten(json.loads(path.read_text()))
    new = _flatten(json.loads(config_lib.config_to_json(config)))
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    for key in changed:
        logging.warning("config.%s changed since the last run in this workdir: %r -> %r", key, old.get(key), new.get(key))


def run(args) -> int:
    """CLI entry: returns 0 on success, 128+signal when preempted (checkpoint saved), 1 on errors."""
    from jaxalign.train import loop

    try:
        config = config_lib.load_config(args.config, args.extra_args)
    except config_lib.ConfigError as error:
        logging.error("%s", error)
        return 2
    try:
        train(config, args.workdir)
    except loop.Preempted as stop:
        logging.warning("%s", stop)
        return 128 + (stop.signum or 15)
    except (loop.NonFiniteLossError, FileNotFoundError) as error:
        logging.error("%s", error)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jaxalign train` as a standalone entry point (used by the thin scripts in experiments/)."""
    from jaxalign import cli

    return cli.main(["train", *(sys.argv[1:] if argv is None else argv)])
