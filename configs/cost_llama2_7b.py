"""Cost model on Llama-2-7B, upstream safe-rlhf `scripts/cost-model.sh` values.

Identical to the reward config except the stage (safety-preference pairs, cost loss with the
sign terms). Mesh: one TPU v4-32 slice (16 chips), fully sharded.

    jaxalign train --config configs/cost_llama2_7b.py --workdir out/cost_llama2_7b
"""

import ml_collections

from configs import reward_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = reward_llama2_7b.get_config()
    config.stage = "cost"  # stages/score.py with the safety-preference loss (safe_rlhf/values/cost/trainer.py)
    return config
