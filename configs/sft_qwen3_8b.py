"""SFT of Qwen3-8B on PKU-SafeRLHF v1: configs/sft_llama3_8b.py with the model swapped
(configs/models_8b.py: Qwen3-8B's config.json fields; stage inputs out/*_qwen3_8b/export).

    jaxalign plan --config configs/sft_qwen3_8b.py --topology v5p-16     # memory per chip, roofline
    jaxalign train --config configs/sft_qwen3_8b.py --workdir out/sft_qwen3_8b
"""

# planned: v5p-16, peak GiB per chip: train 26.88

import ml_collections

from configs import models_8b, sft_llama3_8b


def get_config() -> ml_collections.ConfigDict:
    return models_8b.fork(sft_llama3_8b.get_config(), "qwen3_8b")
