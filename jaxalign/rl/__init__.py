"""RL from human feedback with a safety constraint: one loop, any algorithm of rl/algorithms (config.stage).

settings.py (RLSettings: the shared config.rl; AlgorithmSettings: the base of config.rl.<algorithm>),
algorithms/ (the seam: roles, advantages, actor loss, lambda hooks of each algorithm), roles.py (the
roles, how they are applied and loaded), rollout.py (scoring a rollout into an Experience), steps.py
(the jitted generate / score / train steps), iteration.py (one iteration on the host), ptx.py (the
PTX examples), stacking.py (roles of one architecture as one pass), evaluation.py (in-loop evaluation).
The stage that wires them from a config is jaxalign/stages/rl.py.
"""
