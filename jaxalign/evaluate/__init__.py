"""Evaluation: reward/cost score distributions and metrics (scores.py), `jaxalign evaluate` (commands.py)."""
