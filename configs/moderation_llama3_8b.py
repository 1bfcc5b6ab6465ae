"""Moderation model of Llama-3.1-8B on PKU-SafeRLHF v1: the SFT export's backbone + unsafe / 19-category /
severity heads on every token (streaming), trained on the QA pairs (two per release row) with the
reward model's upstream optimiser values (lr 2e-5 cosine, 3% warmup, 128 answers per update,
max_length 512) for 2 epochs; the unsafe threshold is chosen on 5% of the train rows held out.

The model's config.json fields are in configs/models_8b.py (shapes for a plan before any checkpoint
exists) and checkpoint paths; init_path is the stage input named below.
Mesh: TPU v5p-16 (8 chips on 2 hosts), fsdp=8.

    jaxalign plan --config configs/moderation_llama3_8b.py --topology v5p-16     # memory per chip, roofline
    jaxalign train --config configs/moderation_llama3_8b.py --workdir out/moderation_llama3_8b
"""

# planned: v5p-16, peak GiB per chip: PLANNED_moderation_llama3_8b

import ml_collections

from configs import models_8b, reward_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = models_8b.use(reward_llama2_7b.get_config(), "llama3_8b")
    config.stage = "moderation"  # stages/moderation.py; config.moderation keeps base's coefficients
    config.model.init_path = "out/sft_llama3_8b/export"  # the SFT export's backbone + fresh heads
    config.data.batch_size = 128  # QA answers per update
    config.data.eval_batch_size = 128
    config.train.eval_every = 1100  # about once per epoch: ~148k QA answers of PKU-SafeRLHF/train / 128
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1  # v5p-16: 8 chips
    return config
