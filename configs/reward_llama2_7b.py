"""Reward model on Llama-2-7B, upstream safe-rlhf `scripts/reward-model.sh` values.

Upstream: 8 GPUs x per-device batch 16 = 128 pairs per update (no accumulation), 2 epochs,
lr 2e-5 cosine with 3% warmup, weight decay 0.1, sequence-wise loss with regularization 0.001,
EMA(0.9) score normalizer tracked but not applied, max_length 512, bf16, gradient checkpointing.

Mesh: TPU v4-32 = 16 chips on 4 hosts (32 GiB HBM each), fsdp=16. fp32 params + grads + two
AdamW moments of 6.7B parameters are ~108 GB, ~6.8 GB per chip; each chip runs 8 pairs =
16 sequences of 512 tokens (better and worse concatenated into one forward).

    jaxalign train --config configs/reward_llama2_7b.py --workdir out/reward_llama2_7b
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "reward"  # stages/score.py with the preference-pair loss
    config.model.init_path = "out/sft_llama2_7b/export"  # the SFT policy (upstream: alpaca-7b-reproduced)
    config.model.hf_config.max_position_embeddings = 4096  # Llama-2 context (used only for random init)
    config.model.hf_config.rms_norm_eps = 1e-5  # Llama-2 value (used only for random init)
    config.model.dtype = "bfloat16"  # --bf16 True; params and optimizer moments stay fp32
    config.model.param_dtype = "float32"  # fp32 master weights (DeepSpeed bf16 keeps fp32 copies)
    config.model.remat_policy = "full"  # --gradient_checkpointing
    config.tokenizer = ""  # the tokenizer exported with the SFT model
    config.data.source = "data/PKU-SafeRLHF"  # the released dataset (PKU-SafeRLHF/train, /test)
    config.data.batch_size = 128  # per-device 16 × 8 GPUs in upstream's run
    config.data.eval_batch_size = 128  # same as training
    config.mesh.fsdp = 16  # TPU v4-32: 16 chips, parameters and optimizer state fully sharded
    config.mesh.distributed = True  # 4 hosts; coordinator auto-detected on TPU
    config.train.epochs = 2  # --epochs 2
    config.train.learning_rate = 2e-5  # --learning_rate 2e-5
    config.train.lr_schedule = "cosine"  # --lr_scheduler_type cosine
    config.train.warmup_ratio = 0.03  # --lr_warmup_ratio 0.03
    config.train.weight_decay = 0.1  # --weight_decay 0.1
    config.train.log_every = 1  # upstream logs every step
    config.train.eval_every = 577  # once per epoch (--eval_strategy epoch): 73,907 train pairs / 128
    # config.score keeps base's upstream values: sequence-wise loss, regularization 0.001, EMA(0.9)
    # normalizer tracked but not applied.
    return config
