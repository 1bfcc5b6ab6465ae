"""Tiny PPO with static reward shaping R - nu*C on CPU (nu = rl.ppo_reward_shaping.nu, one critic).

    jaxalign train --config configs/ppo_reward_shaping_tiny.py --workdir out/ppo_rs_tiny
"""

from configs import ppo_lag_tiny


def get_config():
    config = ppo_lag_tiny.get_config()
    config.stage = "ppo_reward_shaping"
    config.rl.kl_coeff = 0.02  # ppo-reward-shaping.sh
    config.rl.ppo_reward_shaping.nu = 1.0
    return config
