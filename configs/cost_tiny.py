"""Tiny cost model on CPU: the reward_tiny setup on the mini dataset's harmlessness pairs.

    jaxalign train --config configs/cost_tiny.py --workdir out/cost_tiny
"""

import ml_collections

from configs import reward_tiny


def get_config() -> ml_collections.ConfigDict:
    config = reward_tiny.get_config()
    config.stage = "cost"  # stages/score.py: safety-preference loss + sign terms (safe-rlhf values/cost)
    return config
