"""Tiny PPO-Lagrangian on CPU whose cost is the tiny moderation model's P(unsafe), charged per token
from its streaming head: the ppo_lag_tiny run with config.rl.ppo_lag.cost_per_token.

Run the tiny SFT, reward and moderation stages first (see configs/README.md), then

    jaxalign train --config configs/ppo_lag_moderation_tiny.py --workdir out/ppo_lag_moderation_tiny

Token t of an answer costs the change of P(unsafe | prefix) it caused (rl/algorithms/ppo_lag.py PPOLagSettings.cost_per_token);
lambda still compares the answers' P(unsafe) at their end with the threshold.
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()  # tiny shapes, rollout, PTX and optimizers of ppo_lag_tiny
    rl = config.rl
    rl.cost_model_path = "out/moderation_tiny/export"  # a moderation export
    rl.cost_signal = "unsafe"  # P(unsafe); expected_severity / severity3 / category:<i> also stream
    rl.ppo_lag.cost_per_token = True
    rl.ppo_lag.threshold = 0.05  # at most 5% of the answers unsafe
    return config
