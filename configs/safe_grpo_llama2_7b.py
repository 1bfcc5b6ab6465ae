"""Safe GRPO on Llama-2-7B: ppo_lag_llama2_7b (upstream ppo-lag.sh values) without the two critics,
32 prompts x 4 responses = the same 128 sequences per rollout, reward and cost advantages normalised
within each prompt's group, combined with λ (threshold 0, λ 1 / lr 0.1 / max 5, window 128).

Mesh: TPU v4-64 = 32 chips, fsdp=32, as PPO-Lagrangian; four roles instead of six (actor + frozen
reference, reward, cost): the two critics' params, grads and AdamW moments (~2 x 108 GB) are gone.
AOT plan of the update step (actor + PTX [+ 2 critics]; 128 sequences of 128 + 384 tokens, bf16
compute, fp32 params and AdamW, remat full, simulated 64-device CPU mesh, fsdp=64): per device
1.18 GiB state + 4.29 GiB temporaries = 5.46 GiB peak, against PPO-Lagrangian's 3.48 + 6.38 =
9.86 GiB (-45%).

    jaxalign train --config configs/safe_grpo_llama2_7b.py --workdir out/safe_grpo_llama2_7b
"""

import ml_collections

from configs import ppo_lag_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_llama2_7b.get_config()
    config.stage = "safe_grpo"
    config.data.batch_size = 32  # prompts per rollout (x num_return_sequences = 128 sequences)
    config.rl.num_return_sequences = 4
    return config
