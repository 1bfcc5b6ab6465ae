"""Tiny KTO on CPU (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8) from PKU-SafeRLHF's per-answer
safety labels: every answer of the mini train split, unpaired, desirable when labelled safe and
undesirable when not (the qa view). The reference point z_0 is estimated from mismatched answers in
each batch.

    jaxalign train --config configs/kto_tiny.py --workdir out/kto_tiny
"""

import ml_collections

from configs import dpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = dpo_tiny.get_config()
    config.stage = "kto"
    config.data.batch_size = 32  # answers per step (dpo_tiny's 16 pairs = 32 answers): ~170 updates an epoch
    config.data.eval_batch_size = 64
    # dpo_tiny's 5e-5 takes harmful answers to 4.5% but breaks 53% of them (the policy stops writing the
    # "Sure." that opens every unsafe mini answer and starts mid-sentence); 2.5e-5: 26% harmful, 7.6%
    # broken; 1e-5: 39% / 4.5% (SFT: 47% / 4.0%; exact judge, test prompts, one seed; docs/methods.md)
    config.train.learning_rate = 2.5e-5
    config.dpo.beta = 0.1
    # λ_D, λ_U: mini's answers are ~55% safe, so λ_D·n_D / (λ_U·n_U) ~ 1.2, inside the paper's [1, 4/3]
    config.dpo.desirable_weight = 1.0
    config.dpo.undesirable_weight = 1.0
    return config
