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


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "sft"  # sft | reward | cost | ppo | ppo_lag | ppo_reward_shaping
    config.seed = 42  # seeds parameter init, dropout-free training RNG and data shuffling

    config.model = model = ml_collections.ConfigDict()
    model.init_path = ""  # HF model dir (config.json + *.safetensors) to start from; "" = random init
    # HF-style config.json fields used for random init when init_path is "" (LlamaConfig.from_hf_config).
    model.hf_config = ml_collections.ConfigDict(
        dict(
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
    model.remat_policy = "none"  # activation checkpointing per layer: none | full | dots (see llama.py)
    model.scan_layers = True  # lax.scan over decoder layers (fast compile; params stacked on "layers")

    config.tokenizer = ""  # HF tokenizer dir; "" = the tokenizer saved in model.init_path

    config.data = data = ml_collections.ConfigDict()
    data.source = ""  # directory of a release-layout dataset (e.g. PKU-SafeRLHF or the mini dataset)
    data.name = "default"  # dataset config / subset name inside the source (e.g. default, alpaca-7b)
    data.train_split = "train"
    data.eval_split = "test"  # "" = no evaluation
    data.max_length = 512  # every sequence is padded/truncated to this length (static shapes)
    data.prompt_template = "upstream"  # upstream ("BEGINNING OF CONVERSATION: USER: ... ASSISTANT:") | fork
    data.batch_size = 16  # global micro-batch (sequences per forward pass, all devices together)
    data.eval_batch_size = 16  # global eval batch
    data.shuffle = True  # shuffle training examples (the permutation depends on seed and epoch)

    config.mesh = mesh = ml_collections.ConfigDict()
    # Mesh axis sizes; -1 takes the devices left over (at most one -1). Product = device count.
    mesh.data = 1  # pure data parallel (replicated parameters)
    mesh.fsdp = -1  # data parallel with parameters and optimizer state sharded (ZeRO-3 like)
    mesh.tensor = 1  # tensor (model) parallel within a layer
    # Logical axis -> mesh axes; the model annotates every parameter/activation with logical names.
    mesh.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("vocab", "tensor"),
        ("layers", None),
    )
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
    return config
