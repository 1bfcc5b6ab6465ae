"""Tiny SafeDPO on CPU (arXiv 2505.20065): dpo_tiny on the mini dual-preference pairs, the preferred
answer swapped when it is unsafe and the other safe, plus the safety margin Δ. No reward or cost model.

    jaxalign train --config configs/safe_dpo_tiny.py --workdir out/safe_dpo_tiny
"""

import ml_collections

from configs import dpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = dpo_tiny.get_config()
    config.stage = "safe_dpo"
    config.dpo.safety_margin = 2.0  # Δ
    return config
