"""Tiny single-preference reward model on CPU: the paper's "trade-off from scratch" baseline, one
reward model on the single-dimension release (one holistic preference per pair, no cost model).

The mini dataset's single release comes from the dual one (experiments/mini_single.py), then

    python experiments/mini_single.py --mini out/mini --out out/mini_single
    jaxalign train --config configs/reward_single_tiny.py --workdir out/reward_single_tiny
"""

import ml_collections

from configs import reward_tiny


def get_config() -> ml_collections.ConfigDict:
    config = reward_tiny.get_config()  # the reward stage: preference pairs of better_response_id
    config.data.source = "out/mini_single"  # a single-dimension release (PKU-SafeRLHF-single or mini_single)
    config.data.name = "single-default"  # the single-* configs of the release (pku_saferlhf.config_names)
    return config
