"""PPO-Lagrangian (Safe RLHF) on Llama-2-7B with the upstream safe-rlhf `scripts/ppo-lag.sh` values.

Six roles: actor + frozen reference (the SFT export), frozen reward and cost models, and reward /
cost critics initialised from them. Upstream: 8 GPUs x 16 prompts = 128 prompts per rollout, one
PPO update per rollout (no minibatches, no PPO epochs), max_length 512 (prompt + response), bf16,
gradient checkpointing, actor lr 1e-5 cosine (3% warmup, wd 0.01), critic lr 5e-6 constant,
kl_coeff 0.01, clip 0.2 / 50 / 5, ptx_coeff 16, threshold 0, lambda_init 1, lambda_lr 0.1,
lambda_max 5, episode-cost window 128.

Mesh: TPU v4-64 = 32 chips, fsdp=32: the two trained 7B roles with AdamW (fp32, ~108 GB for
the actor + ~108 GB for each critic) and the three frozen 7B roles (fp32 ~27 GB each) are all
fully sharded; experiments/benchmark_rl.py prints the compiled per-device memory of each step.

    jaxalign train --config configs/ppo_lag_llama2_7b.py --workdir out/ppo_lag_llama2_7b
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stage = "ppo_lag"
    config.seed = 42
    config.model.init_path = "out/sft_llama2_7b/export"  # actor + reference (upstream: alpaca-7b-reproduced)
    config.model.dtype = "bfloat16"  # --bf16 True; fp32 master weights and moments
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"  # --actor/critic_gradient_checkpointing
    config.tokenizer = ""  # the tokenizer exported with the SFT model
    config.data.source = "data/PKU-SafeRLHF"  # prompts of PKU-SafeRLHF/train
    config.data.eval_split = ""
    config.data.batch_size = 128  # 16 prompts per GPU x 8 GPUs
    config.mesh.fsdp = 32  # TPU v4-64
    config.mesh.distributed = True
    config.train.epochs = 1
    config.train.learning_rate = 1e-5  # --actor_lr
    config.train.lr_schedule = "cosine"
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.01  # --actor_weight_decay
    config.train.max_grad_norm = 1.0
    config.checkpoint.save_every = 50
    config.train.log_every = 1  # one metrics record per iteration
    config.checkpoint.keep = 2
    # config.rl keeps base's upstream ppo-lag.sh values (kl 0.01, clip 0.2/50/5, ptx 16, threshold 0,
    # lambda 1 / lr 0.1 / max 5, window 128, critic lr 5e-6 constant); only the role paths are set.
    config.rl.reward_model_path = "out/reward_llama2_7b/export"  # reward stage export (frozen)
    config.rl.cost_model_path = "out/cost_llama2_7b/export"  # cost stage export (frozen)
    return config
