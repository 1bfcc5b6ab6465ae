"""SafeDPO (Kim et al., ICLR 2026, arXiv 2505.20065) on Llama-2-7B: dpo_llama2_7b on the dual-preference
pairs of PKU-SafeRLHF/train with their safety labels (safety-aware transform + margin Δ); no reward or
cost model, so the same two-model memory as DPO (mesh: TPU v4-32, fsdp=16).

    jaxalign train --config configs/safe_dpo_llama2_7b.py --workdir out/safe_dpo_llama2_7b
"""

import ml_collections

from configs import dpo_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = dpo_llama2_7b.get_config()
    config.stage = "safe_dpo"
    config.dpo.safety_margin = 2.0  # Δ (the paper's one extra hyper-parameter; tune on the eval split)
    return config
