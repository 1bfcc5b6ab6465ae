"""Training: state.py (TrainState), optim.py (AdamW + schedule + decay mask), loop.py (the
generic step loop), checkpoint.py (Orbax), metrics.py (JSONL + TensorBoard), workdir.py (the
run-directory lock). The stage runners and `jaxalign train` (stages/commands.py) are in
jaxalign/stages/."""
