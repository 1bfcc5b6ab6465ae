"""Tiny Safe GRPO with the KL in the loss (DeepSeekMath's GRPO, k3 estimator; rl/algorithms/safe_grpo_k3.py)
on CPU: safe_grpo_tiny whose reward and cost are not KL-shaped, β = config.rl.kl_coeff in the loss.

    jaxalign train --config configs/safe_grpo_k3_tiny.py --workdir out/safe_grpo_k3_tiny
"""

import ml_collections

from configs import safe_grpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = safe_grpo_tiny.get_config()  # roles, actor lr, PTX, 4 responses per prompt
    config.stage = "safe_grpo_k3"
    config.rl.kl_coeff = 0.04  # β of DeepSeekMath's GRPO runs
    k3 = config.rl.safe_grpo_k3  # safe_grpo_tiny's constraint and λ window
    k3.threshold = config.rl.safe_grpo.threshold
    k3.episode_cost_window_size = config.rl.safe_grpo.episode_cost_window_size
    return config
