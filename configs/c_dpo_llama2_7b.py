"""C-DPO (Liu, Sun & Zheng, arXiv 2403.02475) on Llama-2-7B: dpo_llama2_7b with labels from r - λc of
the 7B reward and cost models (frozen roles) and λ by dual ascent against the cost threshold.

Mesh: TPU v4-32, fsdp=16: the trained policy (~108 GB with AdamW) and three frozen fp32 7B roles
(reference, reward, cost: ~27 GB each) fully sharded, ~11.8 GB per chip before activations.

    jaxalign train --config configs/c_dpo_llama2_7b.py --workdir out/c_dpo_llama2_7b
"""

import ml_collections

from configs import dpo_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = dpo_llama2_7b.get_config()
    config.stage = "c_dpo"
    config.dpo.reward_model_path = "out/reward_llama2_7b/export"
    config.dpo.cost_model_path = "out/cost_llama2_7b/export"
    config.dpo.threshold = 0.0  # the Safe RLHF constraint: expected cost <= 0 (ppo-lag.sh threshold)
    config.dpo.lambda_init = 1.0
    config.dpo.lambda_lr = 0.02  # one step per update of 128 pairs (~1150 updates over 2 epochs)
    config.dpo.lambda_max = 5.0
    return config
