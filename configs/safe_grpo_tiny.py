"""Tiny Safe GRPO on CPU: ppo_lag_tiny without critics, 4 responses per prompt, reward and cost
advantages normalised within each prompt's group and combined with PPO-Lagrangian's λ.

    jaxalign train --config configs/safe_grpo_tiny.py --workdir out/safe_grpo_tiny
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()  # roles, actor lr and PTX of ppo_lag_tiny
    config.stage = "safe_grpo"
    config.data.batch_size = 8  # prompts per rollout: 8 x 4 = ppo_lag_tiny's 32 sequences
    config.rl.num_return_sequences = 4  # the group of each prompt
    # ppo_lag_tiny's constraint and λ window (the other λ settings are base's in both)
    config.rl.safe_grpo.threshold = config.rl.ppo_lag.threshold
    config.rl.safe_grpo.episode_cost_window_size = config.rl.ppo_lag.episode_cost_window_size
    return config
