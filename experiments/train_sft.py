"""Train the SFT stage: the same as `jaxalign train --config configs/sft_tiny.py --workdir DIR ...`.

    python experiments/train_sft.py --config configs/sft_tiny.py --workdir /tmp/sft [--config.a.b=v ...]
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxalign.train import commands  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands.add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    args.extra_args = extra
    return commands.run(args)


if __name__ == "__main__":
    sys.exit(main())
