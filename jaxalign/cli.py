"""The `jaxalign` command: one subcommand per capability, each owned by its module.

Each module listed in `_COMMANDS` exposes `add_arguments(parser)` and `run(args) -> int`;
modules are imported lazily so `jaxalign --help` stays fast and a broken optional
dependency only affects its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, one-line help)
_COMMANDS = {
    "data": ("jaxalign.data.commands", "PKU-SafeRLHF data: mini dataset, stats, validation"),
    "tokenizer": ("jaxalign.models.tokenizer", "build the small BPE tokenizer from a corpus"),
    "init-model": ("jaxalign.models.commands", "write a randomly initialised Llama as an HF checkpoint"),
    "sample": ("jaxalign.generate.commands", "sample a completion from a model directory"),
    "train": ("jaxalign.train.commands", "run a training stage from a config file"),
    "evaluate": ("jaxalign.evaluate.commands", "evaluate reward/cost models and policies"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text)
        command_parser.set_defaults(_module=module_name)
        # Arguments are added lazily, only for the chosen command (see main).
    return parser


def setup_logging() -> None:
    """INFO lines with timestamps for every command; quiet the JAX backend probe on CPU hosts."""
    # force=True: absl (imported by orbax/tfds) may already have put a handler on the root logger.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxalign` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        parser.parse_args(argv)  # prints help or the unknown-command error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(_COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"jaxalign {name}", description=_COMMANDS[name][1])
    module.add_arguments(command_parser)
    args, extra = command_parser.parse_known_args(argv[1:])
    args.extra_args = extra
    setup_logging()
    if extra and not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        # Bad input (a missing path, a malformed file or value): one clear line, exit 1.
        # The project's errors name the file/field; JAXALIGN_DEBUG=1 shows the traceback.
        if os.environ.get("JAXALIGN_DEBUG"):
            raise
        print(f"jaxalign {name}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
