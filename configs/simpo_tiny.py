"""Tiny SimPO on CPU (Meng, Xia & Chen 2024, arXiv:2405.14734, Eq. 6): dpo_tiny's policy and
helpfulness pairs, reference-free: the implicit reward is β times the mean log-probability of the
answer's tokens, with a target margin γ. No frozen model is loaded.

    jaxalign train --config configs/simpo_tiny.py --workdir out/simpo_tiny
"""

import ml_collections

from configs import dpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = dpo_tiny.get_config()
    config.stage = "simpo"
    config.dpo.beta = 2.0  # β: the paper's 2.0-2.5 (princeton-nlp/SimPO training_configs: 2.0)
    config.dpo.gamma = 1.0  # γ = β·0.5 (upstream's recommended gamma_beta_ratio 0.5)
    return config
