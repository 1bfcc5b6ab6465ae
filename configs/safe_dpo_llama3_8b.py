"""SafeDPO (Kim et al., arXiv 2505.20065) of Llama-3.1-8B on PKU-SafeRLHF v1: safe_dpo_llama2_7b's
values (dpo.sh: lr 1e-6, wd 0.05, beta 0.1; margin 2) from the SFT export, frozen reference.

The model's config.json fields are in configs/models_8b.py (shapes for a plan before any checkpoint
exists) and checkpoint paths; init_path is the stage input named below.
Mesh: TPU v5p-16 (8 chips on 2 hosts), fsdp=8, the state and frozen models fully sharded.

    jaxalign plan --config configs/safe_dpo_llama3_8b.py --topology v5p-16     # memory per chip, roofline
    jaxalign train --config configs/safe_dpo_llama3_8b.py --workdir out/safe_dpo_llama3_8b
"""

# planned: v5p-16, peak GiB per chip: PLANNED_safe_dpo_llama3_8b

import ml_collections

from configs import models_8b, safe_dpo_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = models_8b.use(safe_dpo_llama2_7b.get_config(), "llama3_8b")
    config.model.init_path = "out/sft_llama3_8b/export"  # the SFT export (actor / backbone)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 8, 1  # v5p-16: 8 chips
    return config
