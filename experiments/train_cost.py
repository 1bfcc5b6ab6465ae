"""Train a cost model: the same as `jaxalign train`, runnable from a checkout.

    python experiments/train_cost.py --config configs/cost_tiny.py --workdir out/cost_tiny [--config.a.b=v ...]
    python experiments/train_cost.py --config configs/cost_llama2_7b.py --workdir gs://bucket/cost_llama2_7b
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxalign.train import commands  # noqa: E402

if __name__ == "__main__":
    sys.exit(commands.main())
