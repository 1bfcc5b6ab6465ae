"""DPO on Llama-2-7B with the upstream values (safe-rlhf scripts/dpo.sh, safe_rlhf/algorithms/dpo/trainer.py).

Upstream: policy and frozen reference both from the SFT model (alpaca-7b-reproduced), helpfulness
pairs of PKU-SafeRLHF/train, 8 GPUs x 16 = 128 pairs per update, 2 epochs, lr 1e-6 cosine with 3%
warmup, weight decay 0.05, β (scale_coeff) 0.1, max_length 512, bf16, gradient checkpointing.

Mesh: TPU v4-32 = 16 chips on 4 hosts, fsdp=16, as the reward model. The trained policy (fp32
params + grads + two AdamW moments, ~108 GB) and the frozen fp32 reference (~27 GB) are fully
sharded: ~8.4 GB per chip before activations; each chip runs 8 pairs = 16 sequences through the
policy (with backward, remat full) and the reference (forward only). AOT plan of the update step
(experiments/benchmark_train.py, simulated 16-device mesh): 17.0 GiB peak per chip = 6.3 GiB
arguments (policy state + the frozen reference) + 10.8 GiB temporaries: fits v4 (32 GiB), v5p and
v6e chips, not v5e (16 GiB).

    jaxalign train --config configs/dpo_llama2_7b.py --workdir out/dpo_llama2_7b
"""

import ml_collections

from configs import reward_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = reward_llama2_7b.get_config()  # model, precision, remat, data, 128 pairs, v4-32 mesh, 2 epochs
    config.stage = "dpo"
    config.train.learning_rate = 1e-6  # dpo.sh --learning_rate 1e-6
    config.train.weight_decay = 0.05  # dpo.sh --weight_decay 0.05
    config.dpo.beta = 0.1  # dpo.sh --scale_coeff 0.1
    return config
