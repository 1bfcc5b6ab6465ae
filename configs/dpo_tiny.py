"""Tiny DPO on CPU: the sft_tiny policy (and a frozen copy as reference) on the mini helpfulness pairs.

Run the tiny SFT stage first (see configs/README.md), then

    jaxalign train --config configs/dpo_tiny.py --workdir out/dpo_tiny
"""

import ml_collections

from configs import sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = sft_tiny.get_config()  # tiny model shape, mini data, max_length
    config.stage = "dpo"
    config.model.init_path = "out/sft_tiny/export"  # policy + frozen reference
    config.tokenizer = ""  # the tokenizer exported with the SFT model
    config.data.batch_size = 16  # pairs per step (2 x 16 sequences per forward, for policy and reference)
    config.data.eval_batch_size = 32
    config.train.epochs = 1  # ~170 updates on the mini train split
    config.train.learning_rate = 5e-5  # upstream 1e-6 is for 7B; 5e-4 breaks the tiny policy (94% broken answers)
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.05  # upstream dpo.sh --weight_decay 0.05
    config.train.eval_every = 50
    config.train.eval_batches = -1  # the whole mini test split
    config.dpo.beta = 0.1  # upstream dpo.sh --scale_coeff 0.1
    return config
