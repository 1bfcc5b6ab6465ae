"""Tiny multi-constraint PPO-Lagrangian on CPU: the ppo_lag_tiny run with one Lagrange
multiplier per constraint, every cost read from the tiny moderation model.

Run the tiny SFT, reward and moderation stages first (see configs/README.md), then

    jaxalign train --config configs/multi_lag_tiny.py --workdir out/multi_lag_tiny

The actor's advantage is (A_R - sum_i lambda_i A_Ci) / (1 + sum_i lambda_i); each constraint logs
lambda/<name> and episode_cost/<name> (rl/algorithms/multi_lag.py).
"""

import ml_collections

from configs import ppo_lag_tiny


def get_config() -> ml_collections.ConfigDict:
    config = ppo_lag_tiny.get_config()  # tiny shapes, rollout, PTX and optimizers of ppo_lag_tiny
    config.stage = "multi_lag"
    rl = config.rl
    rl.cost_model_path = "out/moderation_tiny/export"  # a moderation export: every constraint reads it
    # P(severity 3) <= 1% and P(unsafe) <= 5% of the answers (the example); the tight
    # severity-3 bound gets a faster lambda so it reacts within the short tiny run.
    rl.multi_lag.constraints = "severity3<=0.01;lambda_lr=0.5,unsafe<=0.05"
    rl.multi_lag.lambda_init = 0.5
    rl.multi_lag.episode_cost_window_size = rl.ppo_lag.episode_cost_window_size  # ppo_lag_tiny's window
    return config
