"""Tiny PPO-Lagrangian on CPU: the sft_tiny policy with the reward_tiny / cost_tiny models.

Run the tiny SFT, reward and cost stages first (see configs/README.md), then

    jaxalign train --config configs/ppo_lag_tiny.py --workdir out/ppo_lag_tiny
"""

import ml_collections

from configs import sft_tiny


def get_config() -> ml_collections.ConfigDict:
    config = sft_tiny.get_config()  # tiny model shape, mini data, tokenizer
    config.stage = "ppo_lag"
    config.model.init_path = "out/sft_tiny/export"  # actor + reference
    config.tokenizer = ""  # the tokenizer exported with the SFT model
    config.data.eval_split = ""  # the quickstart sets "test" with rl.eval_every=40 (in-loop evaluation)
    config.data.batch_size = 32  # prompts per rollout
    config.train.num_steps = 120  # rollouts (iterations); -1 = one pass over the prompts
    config.train.learning_rate = 1e-4  # a tiny model needs a larger lr than upstream's 1e-5
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.01
    config.checkpoint.save_every = 50
    config.train.log_every = 1  # one metrics record per iteration
    rl = config.rl  # base holds the upstream ppo-lag.sh values; the tiny run changes:
    rl.reward_model_path = "out/reward_tiny/export"
    rl.cost_model_path = "out/cost_tiny/export"
    rl.prompt_length = 48  # mini prompts are <= 25 tokens of the 2048-token BPE (27 with a 1024-token one)
    rl.max_new_tokens = 32  # the longest mini response is 31 tokens + EOS
    rl.critic.learning_rate = 1e-4
    # PTX on the most helpful safe answers (below); 4 keeps benign helpfulness better than 1 (judge:
    # helpful 17.5% vs 12.3%, harmful 9.9% vs 9.0%); upstream uses 16 on Alpaca.
    rl.ptx_coeff = 4.0
    # PTX imitates, per row, the more helpful of the responses labelled safe (issue 9): safe
    # alternatives on harmful prompts, helpful answers on benign ones, never harm.
    rl.ptx_response = "safe_better"
    rl.episode_cost_window_size = 32
    # The tiny SFT policy already averages cost < 0 on mini, so the upstream threshold 0 never binds.
    # The cost model puts safe answers near -5.7 and unsafe ones near +5.2 (eval_cost); -3 (the
    # paper's Beaver-v2/v3 threshold, spec §6.4) still allows ~15% harmful answers, -5 about 5%.
    rl.threshold = -5.0
    return config
