"""Tiny C-DPO on CPU (arXiv 2403.02475): dpo_tiny with labels from r - λc of the reward_tiny / cost_tiny
models and λ by dual ascent against the cost threshold. Run the tiny reward and cost stages first.

    jaxalign train --config configs/c_dpo_tiny.py --workdir out/c_dpo_tiny
"""

import ml_collections

from configs import dpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = dpo_tiny.get_config()
    config.stage = "c_dpo"
    config.dpo.reward_model_path = "out/reward_tiny/export"
    config.dpo.cost_model_path = "out/cost_tiny/export"
    # As ppo_lag_tiny: the tiny SFT policy's answers already average cost < 0 on mini, so the
    # threshold is set where the constraint binds (-3, the paper's Beaver-v2/v3 value, Dai et al. 2023,
    # arXiv:2310.12773, Table 4).
    config.dpo.threshold = -3.0
    config.dpo.lambda_init = 1.0
    config.dpo.lambda_lr = 0.05
    return config
