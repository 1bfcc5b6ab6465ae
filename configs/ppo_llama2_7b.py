"""PPO baseline on Llama-2-7B (upstream `scripts/ppo.sh`): reward only, one critic, kl_coeff 0.02.

The cost model is still scored for logging (episode cost); set rl.cost_model_path="" to skip it.

    jaxalign train --config configs/ppo_llama2_7b.py --workdir out/ppo_llama2_7b
"""

from configs import ppo_lag_llama2_7b


def get_config():
    config = ppo_lag_llama2_7b.get_config()
    config.stage = "ppo"
    config.rl.kl_coeff = 0.02  # ppo.sh
    return config
