"""Tiny PPO-Lagrangian with a LoRA actor (issue 12): ppo_lag_tiny with rank-8 adapters on every projection.

The SFT export is loaded once, as the frozen reference; the actor is adapters on it, so the RL state and
its checkpoints hold the adapters (+ the two critics) instead of a second copy of the policy. The export is
the merged actor (config.lora.export="adapters": an HF PEFT dir).

    jaxalign train --config configs/ppo_lag_lora_tiny.py --workdir out/ppo_lag_lora_tiny
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.train.learning_rate = 1e-3  # adapters start at zero effect: a larger lr than full fine-tuning's 3e-4
    return config
