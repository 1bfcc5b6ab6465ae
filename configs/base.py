"""Shared config skeleton of every stage: fork it, don't edit it.

A stage config imports this file, calls `get_config()` and changes a few fields, e.g.

    from configs import base

    def get_config():
        config = base.get_config()
        config.stage = "sft"
        config.train.learning_rate = 2e-5
        return config

Every field below is read by some module; `jaxalign train --config FILE --config.a.b=v` can set any
of them, and an unknown key is an error.
"""

import ml_collections

from jaxalign.parallel import mesh as mesh_lib
from jaxalign.rl import algorithms


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The stage (jaxalign/stages STAGES): sft | reward | cost | moderation | an RL algorithm of rl/algorithms (ppo |
    # ppo_lag | ppo_reward_shaping | safe_grpo | safe_gspo | safe_grpo_k3 | multi_lag) | a pairwise method of
    # objectives/pairwise.py (dpo | safe_dpo | c_dpo | ipo | simpo | kto)
    config.stage = "sft"
    config.seed = 42  # seeds parameter init, dropout-free training RNG and data shuffling

    config.model = model = ml_collections.ConfigDict()
    model.init_path = ""  # HF model dir (config.json + *.safetensors) to start from; "" = random init
    # HF-style config.json fields used for random init when init_path is "" (models.config_from_hf).
    model.hf_config = ml_collections.ConfigDict(
        dict(
            model_type="llama",  # the family: llama | qwen2 | qwen3 | gemma2 | gemma3_text (models/families.py)
            head_dim=None,  # None = hidden_size // num_attention_heads
            vocab_size=32000,  # replaced by the tokenizer's vocabulary size (incl. pad) when known
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    model.dtype = "float32"  # compute dtype: float32 | bfloat16 (logits are always fp32)
    model.param_dtype = "float32"  # storage dtype of parameters and optimizer moments
    model.remat_policy = "none"  # activation checkpointing per layer: none | full | dots_saveable | ... (models/config.py)
    model.scan_layers = True  # lax.scan over decoder layers (fast compile; params stacked on "layers")
    # Full-sequence attention: auto (Pallas splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere) | xla | pallas | cudnn
    model.attention_impl = "auto"

    config.tokenizer = ""  # HF tokenizer dir; "" = the tokenizer saved in model.init_path

    config.data = data = ml_collections.ConfigDict()
    data.source = ""  # directory of a release-layout dataset (e.g. PKU-SafeRLHF or the mini dataset)
    data.name = "default"  # dataset config / subset name inside the source (e.g. default, alpaca-7b)
    # TFDS data dir written by `jaxalign data prepare --data-dir DIR` (ArrayRecord, random access,
    # each host reads its own rows); "" = read the release files under data.source.
    data.prepared_dir = ""
    data.train_split = "train"
    data.eval_split = "test"  # "" = no evaluation
    data.max_length = 512  # every sequence is padded/truncated to this length (static shapes)
    data.prompt_template = "upstream"  # upstream ("BEGINNING OF CONVERSATION: USER: ... ASSISTANT:") | fork | chat | "...{input}..."
    data.batch_size = 16  # global micro-batch (sequences per forward pass, all devices together)
    data.eval_batch_size = 16  # global eval batch
    data.shuffle = True  # shuffle training examples (the permutation depends on seed and epoch)

    config.mesh = mesh = ml_collections.ConfigDict()
    # Mesh axis sizes; -1 takes the devices left over (at most one -1). Product = device count.
    mesh.data = 1  # pure data parallel (replicated parameters)
    mesh.fsdp = -1  # data parallel with parameters and optimizer state sharded (ZeRO-3 like)
    mesh.tensor = 1  # tensor (model) parallel within a layer
    # Logical axis -> mesh axes; the model annotates every parameter/activation with logical names.
    # The default (jaxalign/parallel/mesh.py DEFAULT_AXIS_RULES): ("batch", ("data", "fsdp")),
    # ("embed", "fsdp"), ("mlp" | "heads" | "kv_heads" | "vocab", "tensor"), the rest replicated.
    mesh.axis_rules = mesh_lib.DEFAULT_AXIS_RULES
    mesh.distributed = False  # call jax.distributed.initialize (multi-host: same command on every host)
    mesh.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect (TPU pods, SLURM)
    mesh.num_processes = -1  # -1 = auto-detect
    mesh.process_id = -1  # -1 = auto-detect

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = -1  # optimizer updates; -1 = epochs * ceil(batches_per_epoch / grad_accum_steps)
    train.epochs = 1
    train.learning_rate = 2e-5
    train.lr_schedule = "cosine"  # cosine (to 0 after warmup) | constant (after warmup)
    train.warmup_ratio = 0.0  # warmup steps = int(warmup_ratio * num_steps)
    train.weight_decay = 0.0  # AdamW decoupled decay; no decay on biases and per-layer norm scales
    train.max_grad_norm = 1.0  # global-norm clipping; <= 0 disables
    train.grad_accum_steps = 1  # micro-batches per optimizer update
    train.log_every = 10  # write metrics every N updates (and at the last step)
    train.eval_every = 0  # evaluate every N updates (0 = only at the end when an eval split exists)
    train.eval_batches = -1  # eval batches per evaluation; -1 = the whole eval split

    config.checkpoint = checkpoint = ml_collections.ConfigDict()
    checkpoint.save_every = 1000  # save every N updates; also at the end and on SIGTERM/SIGINT
    checkpoint.keep = 3  # keep the latest K checkpoints
    checkpoint.async_save = True  # write checkpoints in a background thread

    # --- stage groups: every stage config carries them all; each stage reads its own.
    config.sft = sft = ml_collections.ConfigDict()
    sft.response = "both"  # SFT targets per row: both | better | safer (views.sft_examples)

    # reward / cost stages (safe-rlhf safe_rlhf/values/reward/trainer.py, safe_rlhf/values/cost/trainer.py)
    config.score = score = ml_collections.ConfigDict()
    score.score_dim = 1  # one scalar score per token
    score.score_bias = True  # the score head has a bias (upstream default)
    score.loss_type = "sequence-wise"  # sequence-wise | token-wise
    score.regularization = 0.001  # reg * mean(end_score^2) keeps scores near 0
    score.normalizer_type = "ExponentialMovingAverage"  # none | RunningMeanStd | ExponentialMovingAverage
    score.momentum = 0.9  # EMA momentum of the end-score mean/var
    score.normalize_during_training = False  # stats are tracked and exported but not applied
    # cost stage: pairs whose safer answer is labelled unsafe and the other safe (safe-rlhf #181):
    # error (upstream) | skip | keep. The release still has a few, so skip them.
    score.inconsistent_pairs = "skip"

    # RL stages: every algorithm of jaxalign/rl/algorithms (ppo, ppo_lag, ppo_reward_shaping, safe_grpo, multi_lag,
    # ...); the shared values are upstream safe-rlhf scripts/ppo-lag.sh's.
    config.rl = rl = ml_collections.ConfigDict()
    # Roles (upstream safe_rlhf/trainers/rl_trainer.py init_models). The actor and the frozen reference come from
    # model.init_path.
    rl.reward_model_path = ""  # score-model dir of the frozen reward model (a reward stage export)
    rl.cost_model_path = ""  # frozen cost model; "" = none (ppo only)
    rl.reward_critic_model_path = ""  # "" = initialise the reward critic from the reward model
    rl.cost_critic_model_path = ""  # "" = initialise the cost critic from the cost model
    rl.normalize_reward = False  # apply the reward model's stored mean/var
    rl.normalize_cost = False  # apply the cost model's stored var (sign kept)
    # Storage dtype of the frozen roles (the reference = a LoRA actor's base, the reward / cost models = LoRA
    # critics' bases): "" = config.model.param_dtype | bfloat16 (half their memory; the trained roles keep
    # model.param_dtype). With a full actor the reference is then its bf16-rounded init (KL starts at the rounding).
    rl.frozen_param_dtype = ""
    # When cost_model_path is a moderation export, the signal read at the answer's end as the
    # cost: unsafe (P(unsafe)) | expected_severity (sum_k k P(severity k), in [0, 3]) | severity3
    # (P(severity 3)) | category:<index> (P(harm category index), 0-18).
    rl.cost_signal = "unsafe"
    # Rollout: sequences are prompt_length + max_new_tokens long.
    rl.prompt_length = 128  # prompts are left-padded / cut to this many tokens
    rl.max_new_tokens = 384
    # Dynamic padding (upstream pads each batch to its longest prompt): > 0 = each rollout drops the
    # padding columns no row uses, prompts on the left before sampling, responses on the right after it
    # (and the PTX batch on the right), keeping a multiple of length_bucket columns. Results are those
    # of the full lengths; each new length compiles the steps once more. 0 = always prompt_length +
    # max_new_tokens (one compile: the choice for large models, whose compiles take minutes).
    rl.length_bucket = 0
    # > 0: the actor's log-probs (scoring, update, PTX) come from its LM head and log-softmax run this many
    # positions at a time, never the whole [batch, length, vocab] fp32 logits (the largest temporary of an
    # update with a 128k vocabulary); 0 = the whole logits. Same numbers up to fp32 reassociation.
    rl.logits_chunk = 0
    # Old log-probs of the PPO ratio: "recompute" (a scoring forward of the actor, upstream) or "sampler" (the
    # log-probs the sampler recorded while decoding: one forward of the six fewer). With "sampler" the first
    # update of each iteration, whose params are the rollout's, measures |sampler - actor| log-prob gap, and
    # the run stops with an error when its max exceeds max_logprob_gap (a bf16 / int8 decode layout, say).
    rl.old_log_probs = "recompute"
    rl.max_logprob_gap = 1e-3
    rl.temperature = 1.0
    rl.top_p = 1.0
    # PPO (upstream safe_rlhf/algorithms/ppo/trainer.py, safe_rlhf/trainers/rl_trainer.py).
    rl.kl_coeff = 0.01  # beta: -beta*KL on the reward stream, +beta*KL on the cost stream
    rl.clip_range_ratio = 0.2
    rl.clip_range_score = 50.0
    rl.clip_range_value = 5.0
    rl.gamma = 1.0  # hard-coded upstream
    rl.gae_lambda = 0.95  # hard-coded upstream
    rl.ptx_coeff = 16.0  # one actor update on 0.5*(g_RL + ptx_coeff*g_PTX); 0 = no PTX
    rl.ptx_source = ""  # release-layout dir of the PTX SFT data; "" = data.source (upstream: alpaca)
    rl.ptx_name = "default"
    # What the PTX SFT examples imitate (jaxalign/rl/ptx.py; upstream imitates Alpaca, not the safety data):
    # safe_only = every response labelled safe (both of a row when both are), safer = the safer
    # response of each row (may be unsafe when both are), better = the more helpful one, both = every
    # response (imitates unsafe answers too).
    rl.ptx_response = "safe_only"
    # Evaluation inside the RL loop on config.data.eval_split's prompts, every N iterations and at the
    # end (0 = off): mean reward and cost of the policy's answers (and the exact judge's rates on the
    # mini dataset), logged as eval/* to metrics.jsonl and TensorBoard.
    rl.eval_every = 0
    rl.eval_prompts = 64  # held-out prompts per evaluation (the first N distinct ones; -1 = all)
    # Critic optimizer: AdamW with a constant lr (HF "constant" ignores the warmup ratio).
    rl.critic = critic = ml_collections.ConfigDict()
    critic.learning_rate = 5e-6
    critic.lr_schedule = "constant"  # cosine | constant
    critic.warmup_ratio = 0.0
    critic.weight_decay = 0.0
    critic.max_grad_norm = 1.0  # global-norm clipping; <= 0 disables
    # Beyond upstream, off by default.
    rl.whiten_advantages = False
    rl.adaptive_kl = False  # Ziegler et al. controller towards target_kl
    rl.target_kl = 6.0
    rl.kl_horizon = 10000.0
    rl.ppo_epochs = 1  # upstream update_iters
    rl.num_minibatches = 1
    # Responses sampled per prompt (1 upstream); the group of safe_grpo / safe_gspo, whose advantages are
    # normalised within each prompt's group.
    rl.num_return_sequences = 1
    # Each algorithm's own settings: config.rl.<algorithm> (ppo_lag, ppo_reward_shaping, safe_grpo, multi_lag,
    # ...), built from the defaults of its settings dataclass, where each field is documented
    # (jaxalign/rl/algorithms/<algorithm>.py; PPO-Lagrangian's threshold and lambda: LagrangeSettings in ppo_lag.py).
    for name, group in algorithms.config_groups().items():
        rl[name] = ml_collections.ConfigDict(group)

    # The pairwise stages (objectives/pairwise.py METHODS). Each method reads the fields of its settings
    # dataclass from this group by name; fields of dpo / safe_dpo / c_dpo are here, a newer method's own
    # fields are set by its config (ipo_tiny: tau; simpo_tiny: gamma; kto_tiny: desirable_weight, ...).
    config.dpo = dpo = ml_collections.ConfigDict()
    dpo.beta = 0.1  # β: upstream dpo.sh --scale_coeff 0.1 (argparse default 0.02)
    dpo.safety_margin = 2.0  # safe_dpo: Δ, extra margin for a safe preferred answer over an unsafe one
    # c_dpo: labels from r - λc of the frozen reward and cost models; λ by dual ascent (lagrange.py).
    dpo.reward_model_path = ""  # score-model dir (reward stage export)
    dpo.cost_model_path = ""  # score-model dir (cost stage export)
    dpo.normalize_reward = False  # apply the reward model's stored mean/var
    dpo.normalize_cost = False  # apply the cost model's stored var (sign kept)
    dpo.threshold = 0.0  # the constraint: policy cost J_C <= threshold
    dpo.lambda_init = 1.0
    dpo.lambda_lr = 0.05  # one log-space step per micro-batch
    dpo.lambda_max = 5.0  # <= 0: no cap
    dpo.episode_cost_window_size = 16  # batches of policy-cost estimates averaged into J_C

    config.moderation = moderation = ml_collections.ConfigDict()  # moderation stage (objectives/moderation.py)
    moderation.unsafe_coeff = 1.0  # weight of the unsafe BCE
    moderation.category_coeff = 1.0  # weight of the per-category BCE (mean over the 19 categories)
    moderation.severity_coeff = 1.0  # weight of the severity 0-3 cross-entropy
    moderation.stream_coeff = 0.5  # streaming: mean prefix loss of a row vs its end loss (<= 1: the end dominates)
    moderation.max_pos_weight = 10.0  # cap of the per-category positive weights N_neg/N_pos (train frequencies)
    moderation.category_threshold = 0.5  # a category is flagged iff P >= this (saved with the model)
    # The unsafe threshold (max F1) is chosen on this split; "" = hold out validation_fraction of the train rows.
    moderation.validation_split = ""
    moderation.validation_fraction = 0.05  # rows held out of the train split when validation_split is ""
    # Also choose each category's flagging threshold (max F1) on the validation data; False = category_threshold.
    moderation.tune_category_thresholds = True

    # LoRA (models/lora.py, through qwix): the trained state holds only the adapters; the base stays
    # frozen and shared (RL: the actor's base is the reference; the critics are fully trained unless lora.critics).
    config.lora = lora = ml_collections.ConfigDict()
    lora.rank = 0  # 0 = off: every parameter is trained
    lora.alpha = 16.0  # the adapter's delta is x @ A @ B * alpha / rank
    lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated projections
    lora.export = "merged"  # merged: an HF dir of W + alpha/r * A @ B (every loader reads it) | adapters: HF PEFT dir
    # RL: True = each critic is adapters (same rank / alpha / targets) + its own score head on its frozen reward /
    # cost model (needs rl.<s>_critic_model_path = "" and a score-model critic: a moderation critic stays full).
    lora.critics = False
    return config
