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
    # A tiny model needs a larger lr than upstream's 1e-5. At 1e-4 (cosine to 0 over 120 iterations) the
    # policy barely moved after iteration 80: PPO-Lagrangian ended 9.9% harmful / 17.5% benign helpful on
    # the judge with lambda at its cap 5; at 3e-4 it meets the constraint by iteration 40, lambda then
    # decays to ~0.9 and the reward lifts benign helpfulness (judge: 0.9% harmful, 51.8% helpful).
    config.train.learning_rate = 3e-4
    config.train.warmup_ratio = 0.03
    config.train.weight_decay = 0.01
    config.checkpoint.save_every = 50
    config.train.log_every = 1  # one metrics record per iteration
    rl = config.rl  # base holds the upstream ppo-lag.sh values; the tiny run changes:
    rl.reward_model_path = "out/reward_tiny/export"
    rl.cost_model_path = "out/cost_tiny/export"
    rl.prompt_length = 48  # mini prompts are <= 25 tokens of the 2048-token BPE (27 with a 1024-token one)
    rl.max_new_tokens = 32  # the longest mini response is 31 tokens + EOS
    # Prompts use <= 27 of the 48 columns: each rollout runs on 32 prompt columns (and the responses and
    # PTX rows on the columns they use, in steps of 16) instead of 48 + 32. Same results.
    rl.length_bucket = 16
    rl.critic.learning_rate = 1e-4
    # PTX on the most helpful safe answers (below); at lr 1e-4, 4 kept benign helpfulness better than 1 (judge:
    # helpful 17.5% vs 12.3%, harmful 9.9% vs 9.0%); upstream uses 16 on Alpaca.
    rl.ptx_coeff = 4.0
    # PTX imitates, per row, the more helpful of the responses labelled safe: safe
    # alternatives on harmful prompts, helpful answers on benign ones, never harm.
    rl.ptx_response = "safe_better"
    rl.ppo_lag.episode_cost_window_size = 32
    # The tiny SFT policy already averages cost < 0 on mini, so the upstream threshold 0 never binds.
    # The cost model gives every safe answer -5.6..-5.8 (benign helpful ones included) and harmful help
    # +3.6 (severity 1) .. +6.6 (severity 3); with 70% harmful prompts the mean episode cost is about
    # -5.75 + 7.7 * (harmful share of answers to harmful prompts): -5 allows ~10% harmful answers, -5.5 ~3%.
    rl.ppo_lag.threshold = -5.5
    return config
