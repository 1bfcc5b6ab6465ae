"""RL from human feedback with a safety constraint: one loop, three algorithms (config.stage).

settings.py (RLSettings: the static view of config.rl), roles.py (the six roles, how they are
applied and loaded), rollout.py (scoring a rollout into an Experience: log-probs, scores, values,
KL-shaped rewards/costs, GAE), ppo_lag.py (the jitted generate / score / train steps, the lambda
update, the checkpointed loop and `run(config, workdir)` for ppo / ppo_lag / ppo_reward_shaping).
"""
