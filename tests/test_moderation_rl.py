"""Moderation as the RL constraint (issue 10): PPO-Lagrangian whose cost is a moderation model's
P(unsafe), and the vector Lagrange update of several constraints against a numpy loop."""

import json

import jax
import numpy as np

from jaxalign import cli
from jaxalign.data import mini
from jaxalign.models import hf, llama
from jaxalign.models import moderation as mm
from jaxalign.models import score
from jaxalign.models import tokenizer as tokenizer_lib
from jaxalign.train import metrics as metrics_lib


def test_ppo_lag_with_a_moderation_cost(tmp_path):
    """`jaxalign train --config configs/ppo_lag_tiny.py` with config.rl.cost_model_path = a moderation
    export: the cost is P(unsafe) in [0, 1], the cost critic is its backbone + a fresh head."""
    mini.write_mini(tmp_path / "data", rows=150, seed=0)
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(tmp_path / "data"), 300, tmp_path / "tok")
    cfg = llama.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    hf.save_pretrained(tmp_path / "sft", cfg, params)
    tok.save_pretrained(str(tmp_path / "sft"))
    reward = score.init_params_from_llama(params["model"], cfg, jax.random.PRNGKey(1))
    score.save_score_model(tmp_path / "reward", cfg, reward, score.ScoreHead(score_type="reward"))
    head = mm.ModerationHead()
    moderation = mm.init_params_from_backbone(params["model"], cfg, jax.random.PRNGKey(2), head)
    moderation["unsafe_head"]["kernel"] = 20 * moderation["unsafe_head"]["kernel"]  # costs spread over (0, 1)
    mm.save_moderation_model(tmp_path / "moderation", cfg, moderation, head)
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/ppo_lag_tiny.py", "--workdir", str(workdir),
            f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
            f"--config.rl.reward_model_path={tmp_path / 'reward'}",
            f"--config.rl.cost_model_path={tmp_path / 'moderation'}", "--config.rl.threshold=0.05",
            "--config.rl.prompt_length=40", "--config.rl.max_new_tokens=8", "--config.data.batch_size=8",
            "--config.train.num_steps=2", "--config.checkpoint.save_every=1"]
    assert cli.main(argv) == 0
    records = metrics_lib.read_metrics(workdir)
    assert [m["step"] for m in records] == [1, 2]
    for record in records:
        assert 0.0 < record["cost"] < 1.0 and 0.0 < record["episode_cost"] < 1.0
        assert np.isfinite(record["cost_critic_loss"]) and np.isfinite(record["lambda"])
    # P(unsafe) of the batch is far above the 5% threshold: lambda grows from lambda_init = 1
    assert records[-1]["lambda"] > 1.0
    assert json.loads((workdir / "config.json").read_text())["rl"]["cost_model_path"].endswith("moderation")
