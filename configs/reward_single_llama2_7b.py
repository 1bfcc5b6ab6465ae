"""Single-preference reward model on Llama-2-7B: reward_llama2_7b (upstream reward-model.sh values, TPU
v4-32) on the single-dimension release of PKU-SafeRLHF (one holistic preference per pair).

    jaxalign train --config configs/reward_single_llama2_7b.py --workdir out/reward_single_llama2_7b
"""

import ml_collections

from configs import reward_llama2_7b


def get_config() -> ml_collections.ConfigDict:
    config = reward_llama2_7b.get_config()
    config.data.source = "data/PKU-SafeRLHF-single-dimension"  # PKU-Alignment/PKU-SafeRLHF-single-dimension
    config.data.name = "single-default"  # the single-* configs (files of the single-dimension release)
    config.train.eval_every = 0  # once at the end (the single release's size differs from the dual one)
    return config
