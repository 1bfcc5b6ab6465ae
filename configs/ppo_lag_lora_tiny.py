"""Tiny PPO-Lagrangian with LoRA: ppo_lag_tiny with rank-8 adapters on every projection of the
actor and of both critics.

The SFT export is loaded once, as the frozen reference; the actor is adapters on it. Each critic is adapters
+ its own score head on its frozen reward / cost model (config.lora.critics). So the RL state and its
checkpoints hold only adapters and two score heads instead of three trained models. The export is the merged
actor (config.lora.export="adapters": an HF PEFT dir).

    jaxalign train --config configs/ppo_lag_lora_tiny.py --workdir out/ppo_lag_lora_tiny
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.critics = True
    config.train.learning_rate = 1e-3  # adapters start at zero effect: a larger lr than full fine-tuning's 3e-4
    config.rl.critic.learning_rate = 1e-3  # the same for the critics' adapters (full critics: 1e-4)
    return config
