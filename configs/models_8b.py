"""The 8B models of the *_llama3_8b / *_qwen3_8b configs: their Hugging Face config.json fields.

`use(config, name)` points config.model at the model: init_path is the HF checkpoint directory you
downloaded (nothing here downloads), hf_config its config.json fields (the shapes `jaxalign plan`
compiles with before the checkpoint exists, and a random init's). Published values:
  Llama-3.1-8B  https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
  Qwen3-8B      https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json
"""

import ml_collections

MODELS = {
    "llama3_8b": dict(
        path="checkpoints/Llama-3.1-8B",
        hf_config=dict(
            model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
            eos_token_id=128001,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192),
        ),
    ),
    "qwen3_8b": dict(
        path="checkpoints/Qwen3-8B",
        hf_config=dict(
            model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
}


def fork(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A config of one 8B model (e.g. configs/reward_llama3_8b.py) for the other model `name`: the
    model swapped (`use`) and every stage input that named the other model renamed (out/sft_llama3_8b/
    export -> out/sft_qwen3_8b/export)."""
    (other,) = [key for key in MODELS if key != name]
    paths = {"model.init_path": config.model.init_path, **{f"rl.{k}": config.rl[k] for k in config.rl
                                                              if k.endswith("_model_path")},
             **{f"dpo.{k}": config.dpo[k] for k in config.dpo if k.endswith("_model_path")}}
    use(config, name)
    for key, value in paths.items():
        group, field = key.split(".")
        if value and value != MODELS[other]["path"]:
            config[group][field] = value.replace(other, name)
    return config


def use(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """config with config.model set to the 8B model `name` (llama3_8b | qwen3_8b), bf16 compute on
    fp32 master weights, full remat, scanned layers; the stage's own init_path is left to the caller."""
    model = MODELS[name]
    config.model.init_path = model["path"]
    config.model.hf_config = ml_collections.ConfigDict(model["hf_config"])
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "full"
    config.model.scan_layers = True
    config.tokenizer = ""  # the tokenizer saved with model.init_path (<pad> added when missing)
    return config
