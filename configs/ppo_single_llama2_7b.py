"""Single-preference PPO on Llama-2-7B: ppo_llama2_7b (upstream ppo.sh) on the single-preference reward
model, the trade-off-from-scratch baseline against PPO-Lagrangian's decoupled reward and cost.

    jaxalign train --config configs/ppo_single_llama2_7b.py --workdir out/ppo_single_llama2_7b
"""

from configs import ppo_llama2_7b


def get_config():
    config = ppo_llama2_7b.get_config()
    config.rl.reward_model_path = "out/reward_single_llama2_7b/export"
    return config
