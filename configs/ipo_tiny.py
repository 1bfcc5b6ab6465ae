"""Tiny IPO on CPU (Azar et al. 2023, arXiv:2310.12036, Eq. 17): dpo_tiny's policy, reference and
helpfulness pairs with the squared loss (h - 1/(2τ))² on the log-ratio margin h instead of DPO's
logistic one: the margin is regressed to a target rather than pushed without bound.

    jaxalign train --config configs/ipo_tiny.py --workdir out/ipo_tiny
"""

import ml_collections

from configs import dpo_tiny


def get_config() -> ml_collections.ConfigDict:
    config = dpo_tiny.get_config()
    config.stage = "ipo"
    config.dpo.tau = 0.1  # τ: target margin 1/(2τ) = 5 nats between the two answers' log-ratios
    return config
