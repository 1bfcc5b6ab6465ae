"""Tiny reward model on CPU: the sft_tiny model shape on the mini dataset's helpfulness pairs.

Prepare the data, tokenizer and SFT model once (see configs/README.md), then

    jaxalign train --config configs/reward_tiny.py --workdir out/reward_tiny
"""

import ml_collections

from configs import base, sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "reward"  # stages/score.py with the preference-pair loss
    config.seed = 0  # same seed as sft_tiny
    config.model.init_path = "out/sft_tiny/export"  # the tiny SFT model; "" = random init below
    config.model.hf_config.update(sft_tiny.get_config().model.hf_config)  # the sft_tiny shape (random init only)
    config.tokenizer = "out/mini_tokenizer"  # `jaxalign tokenizer --data out/mini --out out/mini_tokenizer`
    config.data.source = "out/mini"  # `jaxalign data mini --out out/mini`
    config.data.max_length = 64  # sft_tiny: mini prompt + response + EOS fit
    config.data.batch_size = 16  # 16 pairs = 32 sequences per forward
    config.data.eval_batch_size = 32  # 32 pairs per eval forward
    config.mesh.fsdp = -1  # all local devices (1 on a plain CPU run)
    config.train.epochs = 1  # ~170 updates on the mini train split
    config.train.learning_rate = 1e-3  # a tiny model needs a much larger lr than 2e-5
    config.train.warmup_ratio = 0.03  # upstream warmup
    config.train.weight_decay = 0.1  # upstream --weight_decay 0.1
    config.train.log_every = 10  # a line every 10 updates
    config.train.eval_every = 50  # a few evals per run
    config.train.eval_batches = -1  # the whole mini test split (~300 pairs)
    config.checkpoint.save_every = 100  # a resumable checkpoint every 100 updates
    config.checkpoint.keep = 2  # keep the last two
    # config.score: base's upstream loss, regularization and normalizer
    return config
