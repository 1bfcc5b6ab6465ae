"""The `jaxalign` command: one subcommand per capability, one style, one error policy.

Every subcommand lives in a package's `commands.py` module, which maps it in `COMMANDS` to
`(add_arguments(parser), run(args) -> int)`; `_COMMANDS` below names the module, so modules are
imported lazily (`jaxalign --help` stays fast, and a broken optional dependency only affects its
own subcommand). Commands raise; `main` turns errors into exit codes:

    bad input (ValueError, FileNotFoundError, a config error, a locked workdir, a NaN stop, a full
    disk): one line "jaxalign CMD: error: ..." on stderr, exit 1 (JAXALIGN_DEBUG=1 keeps the traceback)
    SIGTERM/SIGINT during training: the checkpoint is saved, exit 128 + signal
    usage errors: argparse's message, exit 2
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module with COMMANDS, one-line help)
_COMMANDS = {
    "data": ("jaxalign.data.commands", "PKU-SafeRLHF data: mini dataset, stats, validation, prepare"),
    "tokenizer": ("jaxalign.models.commands", "build the small BPE tokenizer from a corpus"),
    "init-model": ("jaxalign.models.commands", "write a randomly initialised causal LM as an HF checkpoint"),
    "sample": ("jaxalign.generate.commands", "sample a completion from a model directory"),
    "chat": ("jaxalign.generate.commands", "multi-turn chat with one or more models side by side"),
    "train": ("jaxalign.stages.commands", "run a training stage from a config file"),
    "plan": ("jaxalign.stages.planning", "compile a stage's steps for a TPU slice: memory per chip, flops, roofline"),
    "evaluate": ("jaxalign.evaluate.commands", "evaluate reward/cost models and RL runs"),
    "arena": ("jaxalign.evaluate.commands", "policies answer the same prompts; reward, cost and judge compare them"),
    "moderate": ("jaxalign.moderation.commands", "moderate (prompt, response) JSONL rows with a moderation model"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text)  # arguments are added lazily, only for the chosen command
    return parser


def setup_logging() -> None:
    """INFO lines with timestamps for every command; quiet the JAX backend probe on CPU hosts."""
    # force=True: absl (imported by orbax/tfds) may already have put a handler on the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def skip_absent_tpu() -> None:
    """With libtpu installed (the `tpu` extra, for `jaxalign plan`) on a host without TPU chips, JAX
    would still start the TPU runtime, which prints a page of warnings before falling back to the
    CPU. Pin JAX to the CPU there; compile-only TPU topologies stay available. JAX_PLATFORMS, when
    set, wins; a host with other PJRT plugins (a GPU) is left to JAX."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if importlib.util.find_spec("jax_plugins") is not None:
        return
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _error(name: str, error: BaseException) -> int:
    if os.environ.get("JAXALIGN_DEBUG"):
        raise error
    print(f"jaxalign {name}: error: {error}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxalign` console script and `python -m jaxalign`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        parser.parse_args(argv)  # prints help or the unknown-command error and exits
        return 2
    name = argv[0]
    skip_absent_tpu()
    module = importlib.import_module(_COMMANDS[name][0])
    add_arguments, run = module.COMMANDS[name]
    command_parser = argparse.ArgumentParser(prog=f"jaxalign {name}", description=_COMMANDS[name][1])
    add_arguments(command_parser)
    args, extra = command_parser.parse_known_args(argv[1:])
    # --config.a.b=v overrides go with a command's --config file; anything else is unknown.
    if extra and not (getattr(args, "config", None) and all(arg.startswith("--config.") for arg in extra)):
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    setup_logging()
    from jaxalign.train import loop  # the exceptions training raises

    try:
        return int(run(args) or 0)
    except loop.Preempted as stop:
        logging.warning("%s", stop)
        return 128 + (stop.signum or 15)
    except (ValueError, FileNotFoundError, loop.NonFiniteError) as error:
        return _error(name, error)
    except OSError as error:  # a full disk, a permission problem: the OS message names the file
        return _error(name, error)


if __name__ == "__main__":
    sys.exit(main())
