"""SFT of Llama-3.1-8B on PKU-SafeRLHF v1: the upstream `scripts/sft.sh` values of sft_llama2_7b (32
sequences x 8 accumulation steps, lr 2e-5 cosine, 3 epochs, max_length 512).

The model's config.json fields are in configs/models_8b.py (shapes for a plan before any checkpoint
exists) and checkpoint paths; init_path is the HF checkpoint you download (nothing here downloads).
Mesh: TPU v5p-16 (8 chips on 2 hosts), fsdp=8, the state and frozen models fully sharded.

    jaxalign plan --config configs/sft_llama3_8b.py --topology v5p-16     # memory per chip, roofline
    jaxalign train --config configs/sft_llama3_8b.py --workdir out/sft_llama3_8b
"""

# planned: v5p-16, peak GiB per chip: train 26.44

import ml_collections

from configs import models_8b, sft_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = models_8b.use(sft_llama2_7b.get_config(), "llama3_8b")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1  # v5p-16: 8 chips
    return config
