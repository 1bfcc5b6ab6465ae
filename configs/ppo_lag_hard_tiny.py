"""Tiny PPO-Lagrangian on the hard variant of mini (`jaxalign data mini --variant hard`): the
ppo_lag_tiny run with the hard variant's lengths. experiments/hard.sh runs it per seed:

    jaxalign train --config configs/ppo_lag_hard_tiny.py --workdir out/hard/seed0/ppo_lag_tiny \
        --config.tokenizer=out/hard/tokenizer --config.data.source=out/hard/data ...
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()  # tiny shapes, rollout, PTX, optimizers and lambda of ppo_lag_tiny
    rl = config.rl
    rl.prompt_length = 48  # hard train prompts are <= 28 tokens of its train-split tokenizer, test ones <= 41
    rl.max_new_tokens = 48  # its longest answer (3 opening sentences, turn-back, alternative) is 40 tokens + EOS
    return config
