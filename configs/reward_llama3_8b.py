"""Reward model of Llama-3.1-8B on PKU-SafeRLHF v1: reward_llama2_7b's upstream `scripts/reward-
model.sh` values (128 pairs, lr 2e-5 cosine, wd 0.1, 2 epochs) on the SFT export's backbone.

The model's config.json fields are in configs/models_8b.py (shapes for a plan before any checkpoint
exists) and checkpoint paths; init_path is the stage input named below.
Mesh: TPU v5p-16 (8 chips on 2 hosts), fsdp=8, the state and frozen models fully sharded.

    jaxalign plan --config configs/reward_llama3_8b.py --topology v5p-16     # memory per chip, roofline
    jaxalign train --config configs/reward_llama3_8b.py --workdir out/reward_llama3_8b
"""

# planned: v5p-16, peak GiB per chip: PLANNED_reward_llama3_8b

import ml_collections

from configs import models_8b, reward_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = models_8b.use(reward_llama2_7b.get_config(), "llama3_8b")
    config.model.init_path = "out/sft_llama3_8b/export"  # the SFT export (actor / backbone)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1  # v5p-16: 8 chips
    return config
