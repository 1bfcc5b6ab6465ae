"""Tiny moderation model on CPU: the sft_tiny backbone + unsafe / 19-category / severity heads on
the mini dataset's QA pairs (two per row), with the streaming (every-prefix) loss.

Prepare the data, tokenizer and SFT model once (see configs/README.md), then

    jaxalign train --config configs/moderation_tiny.py --workdir out/moderation_tiny
    jaxalign evaluate moderation --model out/moderation_tiny/export --data out/mini --out out/eval_moderation
"""

import ml_collections

from configs import base, sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "moderation"  # stages/moderation.py
    config.seed = 0  # same seed as sft_tiny
    config.model.init_path = "out/sft_tiny/export"  # the tiny SFT model's backbone; "" = random init below
    config.model.hf_config.update(sft_tiny.get_config().model.hf_config)  # the sft_tiny shape (random init only)
    config.tokenizer = "out/mini_tokenizer"  # `jaxalign tokenizer --data out/mini --out out/mini_tokenizer`
    config.data.source = "out/mini"  # `jaxalign data mini --out out/mini`
    config.data.max_length = 96  # mini texts are tens of tokens
    config.data.batch_size = 32  # QA answers per update
    config.data.eval_batch_size = 32
    config.mesh.fsdp = -1  # all local devices (1 on a plain CPU run)
    config.train.epochs = 3  # ~480 updates on the mini train split (5% of its rows held out for the thresholds);
    # one epoch already separates safe/unsafe and severity, the 19 categories need three (README)
    config.train.learning_rate = 1e-3  # a tiny model needs a much larger lr than 2e-5
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.0
    config.train.log_every = 10
    config.train.eval_every = 160  # once per epoch
    config.train.eval_batches = -1  # the whole mini test split (~600 answers)
    config.checkpoint.save_every = 100
    config.checkpoint.keep = 2
    # config.moderation: base's coefficients, stream_coeff 0.5, positive weights capped at 10
    return config
