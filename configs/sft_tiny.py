"""Tiny SFT run on CPU: a 3-layer Llama (hidden 96) on the mini dataset, in ~2 CPU-minutes.

Sized so the policy writes: on the exact judge (`jaxalign evaluate judge`) fewer than 5% of
its answers are broken text, and like Alpaca-7B it answers about half the harmful prompts harmfully
(it imitates both responses of every row). Hidden 64 / 2 layers / 1 epoch left ~70% broken.

Prepare the data and tokenizer once (see configs/README.md), then

    jaxalign train --config configs/sft_tiny.py --workdir out/sft_tiny
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "sft"
    config.seed = 0
    hf = config.model.hf_config
    hf.vocab_size = 1024  # replaced by len(tokenizer)
    hf.hidden_size = 96  # 64 / 2 layers could not copy the prompt's target into the templates
    hf.intermediate_size = 192
    hf.num_hidden_layers = 3
    hf.num_attention_heads = 4
    hf.num_key_value_heads = 2  # grouped-query attention, exercised on purpose
    hf.max_position_embeddings = 256
    config.tokenizer = "out/mini_tokenizer"  # `jaxalign tokenizer --data out/mini --out out/mini_tokenizer --vocab-size 2048`
    config.data.source = "out/mini"  # `jaxalign data mini --out out/mini`
    config.data.max_length = 64  # prompt <= 25 + response <= 31 + EOS tokens with the 2048-token BPE
    config.data.batch_size = 16
    config.data.eval_batch_size = 32
    config.mesh.fsdp = -1  # all local devices (1 on a plain CPU run)
    config.train.epochs = 2  # ~670 updates
    config.train.learning_rate = 3e-3  # a tiny random-init model needs a much larger lr than 2e-5
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.0
    config.train.log_every = 10
    config.train.eval_batches = 4
    config.checkpoint.save_every = 100
    config.checkpoint.keep = 2
    config.sft.response = "both"  # SFT targets per row: both | better | safer (views.sft_examples)
    return config
