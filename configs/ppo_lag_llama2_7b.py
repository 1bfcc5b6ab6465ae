"""PPO-Lagrangian (Safe RLHF) on Llama-2-7B with the upstream `scripts/ppo-lag.sh` values (spec §6.1).

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


def rl_config() -> ml_collections.ConfigDict:
    """The `config.rl` group with the upstream ppo-lag.sh values; forks change a few fields."""
    return ml_collections.ConfigDict(
        dict(
            # Roles (spec §3.3). The actor and reference come from config.model.init_path.
            reward_model_path="out/reward_llama2_7b/export",  # score_stage export (frozen reward model)
            cost_model_path="out/cost_llama2_7b/export",  # frozen cost model; "" = none (ppo only)
            reward_critic_model_path="",  # "" = initialise the reward critic from the reward model
            cost_critic_model_path="",  # "" = initialise the cost critic from the cost model
            normalize_reward=False,  # --normalize_reward: apply the RM's stored mean/var
            normalize_cost=False,  # --normalize_cost: apply the CM's stored var (sign kept)
            # Rollout (spec §5.2): total length prompt_length + max_new_tokens = 512.
            prompt_length=128,  # prompts are left-padded / cut to this many tokens
            max_new_tokens=384,
            temperature=1.0,
            top_p=1.0,
            # PPO (spec §5.4-5.6).
            kl_coeff=0.01,  # beta: -beta*KL on the reward stream, +beta*KL on the cost stream
            clip_range_ratio=0.2,
            clip_range_score=50.0,
            clip_range_value=5.0,
            gamma=1.0,  # hard-coded upstream
            gae_lambda=0.95,  # hard-coded upstream
            ptx_coeff=16.0,  # one actor update on 0.5*(g_RL + ptx_coeff*g_PTX); 0 = no PTX
            ptx_source="",  # release-layout dir of the PTX SFT data; "" = data.source (upstream: alpaca)
            ptx_name="default",
            # Critics: AdamW with a constant lr (HF "constant" ignores the warmup ratio).
            critic_learning_rate=5e-6,
            critic_lr_schedule="constant",
            critic_warmup_ratio=0.0,
            critic_weight_decay=0.0,
            # Lagrangian (spec §5.8); for ppo_reward_shaping lambda_init is the constant nu.
            threshold=0.0,  # -d: the constraint is mean cost <= threshold
            lambda_init=1.0,
            lambda_lr=0.1,
            lambda_max=5.0,  # <= 0: no cap
            lambda_update_delay_steps=0,
            episode_cost_window_size=128,
            # Beyond upstream, off by default.
            whiten_advantages=False,
            adaptive_kl=False,  # Ziegler et al. controller towards target_kl
            target_kl=6.0,
            kl_horizon=10000.0,
            ppo_epochs=1,  # upstream update_iters
            num_minibatches=1,
        )
    )


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
    config.checkpoint.keep = 2
    config.rl = rl_config()
    return config
