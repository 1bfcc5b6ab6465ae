"""Tiny cost model on CPU: the reward_tiny setup on the mini dataset's harmlessness pairs.

    jaxalign train --config configs/cost_tiny.py --workdir out/cost_tiny
"""

import ml_collections

from configs import reward_tiny


def get_config() -> ml_collections.ConfigDict:
    config = reward_tiny.get_config()
    config.stage = "cost"  # score_stage.run with the safety-preference loss and sign terms (spec §4.3)
    return config
