"""SFT of Llama-2-7B with the upstream safe-rlhf `scripts/sft.sh` values, on a TPU v4-64.

Upstream: 8 GPUs x per-device batch 4 x 8 gradient-accumulation steps = 256 sequences per update,
3 epochs, lr 2e-5 cosine with 3% warmup, weight decay 0, max_length 512, bf16, gradient
checkpointing. Here the global micro-batch is the same 32 sequences (4 x 8 GPUs) and the 8
micro-batches are accumulated inside one jitted step, so the update is the same.

Mesh: TPU v4-64 = 32 chips (32 GiB HBM each), fsdp=32. fp32 params + grads + two AdamW moments of
6.7B parameters are ~108 GB, i.e. ~3.4 GB per chip. The compiled plan of this step
(experiments/benchmark_train.py, AOT on a simulated mesh) is 6.4 GiB per chip at fsdp=32 and
10.6 GiB at fsdp=16, so a v4-32 (16 chips) also fits; fsdp=32 halves the step time.

    jaxalign train --config configs/sft_llama2_7b.py --workdir out/sft_llama2_7b
    (multi-host: the same command on every host of the slice; mesh.distributed is on)
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "sft"
    config.model.init_path = "checkpoints/Llama-2-7b-hf"  # HF dir (upstream: huggyllama/llama-7b)
    config.model.hf_config.max_position_embeddings = 4096  # Llama-2 (only used for random init)
    config.model.hf_config.rms_norm_eps = 1e-5  # Llama-2 (only used for random init)
    config.model.dtype = "bfloat16"  # --bf16 True; params and AdamW moments stay fp32
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"  # --gradient_checkpointing
    config.model.scan_layers = True
    config.tokenizer = ""  # the tokenizer saved in model.init_path (<pad> is added, rows = mean)
    config.data.source = "data/PKU-SafeRLHF"  # release layout; upstream SFT used alpaca instead
    config.data.max_length = 512  # --max_length 512
    config.data.batch_size = 32  # 4 per device x 8 GPUs upstream
    config.data.eval_batch_size = 32
    config.mesh.data = 1
    config.mesh.fsdp = 32  # TPU v4-64: 32 chips, parameters and optimizer state fully sharded
    config.mesh.tensor = 1
    config.mesh.distributed = True  # 8 hosts; coordinator auto-detected on TPU
    config.train.epochs = 3  # --epochs 3
    config.train.learning_rate = 2e-5  # --learning_rate 2e-5
    config.train.lr_schedule = "cosine"  # --lr_scheduler_type cosine
    config.train.warmup_ratio = 0.03  # --lr_warmup_ratio 0.03
    config.train.weight_decay = 0.0  # --weight_decay 0.0
    config.train.max_grad_norm = 1.0  # DeepSpeed gradient_clipping
    config.train.grad_accum_steps = 8  # --gradient_accumulation_steps 8
    config.train.log_every = 1
    config.train.eval_every = 0  # no eval set upstream
    config.data.eval_split = ""
    config.checkpoint.save_every = 200
    config.checkpoint.keep = 2
    config.sft.response = "both"  # SFT targets per row: both | better | safer (views.sft_examples)
    return config
