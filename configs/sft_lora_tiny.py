"""Tiny SFT with LoRA (Hu et al. 2021, arXiv:2106.09685): sft_tiny's model and data, rank-8 adapters on
every projection.

The base is the random init of sft_tiny (or config.model.init_path: an SFT export) and stays frozen; the
train state and checkpoints hold only the adapters; the export is the merged model
(config.lora.export="adapters": an HF PEFT dir instead).

    jaxalign train --config configs/sft_lora_tiny.py --workdir out/sft_lora_tiny
"""

import ml_collections

from configs import sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = sft_tiny.get_config()
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.train.learning_rate = 3e-3
    return config
