"""Tiny single-preference PPO on CPU: plain PPO on the reward_single_tiny model (the trade-off learnt
from one holistic preference), the baseline of decoupled reward and cost (Safe RLHF §5). The cost
model is scored for logging only.

    jaxalign train --config configs/ppo_single_tiny.py --workdir out/ppo_single_tiny
"""

from configs import ppo_tiny


def get_config():
    config = ppo_tiny.get_config()  # plain PPO (kl 0.02), prompts of the mini dual release
    config.rl.reward_model_path = "out/reward_single_tiny/export"
    return config
