"""Tiny PPO baseline on CPU (reward only, one critic; costs scored for logging).

    jaxalign train --config configs/ppo_tiny.py --workdir out/ppo_tiny
"""

from configs import ppo_lag_tiny


def get_config():
    config = ppo_lag_tiny.get_config()
    config.stage = "ppo"
    config.rl.kl_coeff = 0.02  # ppo.sh
    return config
