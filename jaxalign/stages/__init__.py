"""Stages: one module per stage turns the ConfigDict into typed settings and wires the library.

    from jaxalign import stages
    stages.run(config, workdir)          # dispatch on config.stage

Nothing in the library imports a stage; `jaxalign train` (stages/commands.py) is the entry point.
"""

from __future__ import annotations

import importlib

from jaxalign.objectives.pairwise import METHODS as PAIRWISE_METHODS
from jaxalign.rl import algorithms

# config.stage -> module exposing run(config, workdir); every RL algorithm (rl/algorithms) is a stage of
# stages/rl.py, every method of the pairwise table (objectives/pairwise.py) a stage of stages/dpo.py
STAGES = {
    "sft": "jaxalign.stages.sft",
    "reward": "jaxalign.stages.score",
    "cost": "jaxalign.stages.score",
    **dict.fromkeys(algorithms.ALGORITHMS, "jaxalign.stages.rl"),
    **{name: "jaxalign.stages.dpo" for name in PAIRWISE_METHODS},
    "moderation": "jaxalign.stages.moderation",
}


def stage_module(name: str):
    """The module that runs config.stage `name`."""
    if name not in STAGES:
        raise ValueError(f"config.stage: unknown stage {name!r}; valid: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def run(config, workdir):
    """Runs the stage named by config.stage in `workdir`; returns its run() result."""
    return stage_module(config.stage).run(config, workdir)
