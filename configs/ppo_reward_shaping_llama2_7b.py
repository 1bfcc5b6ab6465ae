"""PPO with static reward shaping R - nu*C on Llama-2-7B (upstream `scripts/ppo-reward-shaping.sh`).

One critic (from the reward model); rl.ppo_reward_shaping.nu is the constant cost weight; kl_coeff 0.02.

    jaxalign train --config configs/ppo_reward_shaping_llama2_7b.py --workdir out/ppo_rs_llama2_7b
"""

from configs import ppo_lag_llama2_7b


def get_config():
    config = ppo_lag_llama2_7b.get_config()
    config.stage = "ppo_reward_shaping"
    config.rl.kl_coeff = 0.02  # ppo-reward-shaping.sh
    config.rl.ppo_reward_shaping.nu = 1.0  # the paper sweeps 0.01 ... 100
    return config
