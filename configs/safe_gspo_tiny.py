"""Tiny Safe GSPO on CPU: safe_grpo_tiny with GSPO's sequence-level ratio and clip (Zheng et al. 2025,
arXiv:2507.18071; rl/algorithms/safe_gspo.py): 8 prompts x 4 responses, reward and cost advantages
normalised within each group and combined with PPO-Lagrangian's λ, one clipped ratio per answer.

    jaxalign train --config configs/safe_gspo_tiny.py --workdir out/safe_gspo_tiny
"""

import ml_collections

from configs import safe_grpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = safe_grpo_tiny.get_config()  # roles, actor lr, PTX, 4 responses per prompt
    config.stage = "safe_gspo"
    # The sequence ratio's clip only binds off-policy: two minibatches of 16 answers per rollout, so the
    # second one is sampled by the policy before the first update (GSPO §5.1 uses four).
    config.rl.num_minibatches = 2
    gspo = config.rl.safe_gspo  # safe_grpo_tiny's constraint and λ window; GSPO's clip range (its defaults)
    gspo.threshold = config.rl.safe_grpo.threshold
    gspo.episode_cost_window_size = config.rl.safe_grpo.episode_cost_window_size
    return config
