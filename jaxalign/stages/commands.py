"""`jaxalign train --config configs/<file>.py --workdir DIR [--allow-config-change] [--config.a.b=v ...]`.

Loads the config (overrides applied, unknown keys rejected, values validated), checks that its
model, tokenizer and data dirs exist (naming the command that makes a missing one), initialises
multi-host JAX when `config.mesh.distributed` is set, takes the workdir's exclusive lock, refuses
to resume a workdir whose config.json differs in a field that changes the run, or whose input
models / tokenizer changed content since WORKDIR/inputs.json fingerprinted them (stages/inputs.py;
both unless --allow-config-change), writes WORKDIR/config.json and runs the stage named by
`config.stage`. Re-running the same command resumes from the latest checkpoint in WORKDIR.
"""

from __future__ import annotations

import pathlib

import jax

from jaxalign import config as config_lib
from jaxalign import stages
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.stages import inputs
from jaxalign.train import loop
from jaxalign.train import workdir as workdir_lib


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config(), e.g. configs/sft_tiny.py")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, export/")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a workdir although its config.json differs in a field that changes the run, "
                             "or an input model / tokenizer dir changed content")


def train(config, workdir: str | pathlib.Path, allow_config_change: bool = False):
    """Runs the stage named by `config.stage` in `workdir` and returns what its run() returns."""
    stages.stage_module(config.stage)  # an unknown stage fails before anything is written
    config_lib.validate_config(config)
    inputs.check_inputs(config)  # a missing model, tokenizer or data dir: one line naming what makes it
    mesh_lib.maybe_initialize_distributed(config.mesh)
    workdir = pathlib.Path(workdir)
    # One run per workdir (WorkdirLockedError naming the holder's pid otherwise); process 0 holds it.
    with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
        if jax.process_index() == 0:
            config_lib.check_and_save_config(config, workdir, allow_change=allow_config_change)
            inputs.check_and_save_fingerprints(config, workdir, allow_change=allow_config_change)
        try:
            return stages.run(config, workdir)
        except loop.NoTargetTokensError as error:
            raise loop.NoTargetTokensError(f"{error}; raise config.data.max_length (now {config.data.max_length})"
                                           ) from None


def run(args) -> int:
    config = config_lib.load_config(args.config, args.extra_args)
    train(config, args.workdir, allow_config_change=args.allow_config_change)
    return 0


COMMANDS = {"train": (add_arguments, run)}  # --config.* overrides arrive as args.extra_args
