"""Train a PPO-Lagrangian policy (or PPO / reward shaping, by config): the same as `jaxalign train`, runnable from a checkout.

    python experiments/train_ppo_lag.py --config configs/ppo_lag_tiny.py --workdir out/ppo_lag_tiny [--config.a.b=v ...]
    python experiments/train_ppo_lag.py --config configs/ppo_lag_llama2_7b.py --workdir gs://bucket/ppo_lag_llama2_7b
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxalign.train import commands  # noqa: E402

if __name__ == "__main__":
    sys.exit(commands.main())
