"""Tiny SFT on the hard variant of mini (`jaxalign data mini --variant hard`): the sft_tiny model
for twice the epochs, at the hard variant's length. experiments/hard.sh runs it per seed.

With sft_tiny's 2 epochs the policy wrote 33% broken answers on the hard test prompts (it mixes the
20 look-alike topics' answers and the opening sentences into other answers) and 3% helpful benign
answers; 4 epochs: 12% broken, 19% helpful (exact judge, seed 0).
"""

import ml_collections

from configs import sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = sft_tiny.get_config()
    config.data.max_length = 80  # hard prompts <= 28 tokens (train) + answers <= 40 tokens + EOS
    config.train.epochs = 4  # ~1270 updates
    return config
