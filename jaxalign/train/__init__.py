"""Training: state.py (TrainState), optim.py (AdamW + schedule + decay mask), loop.py (the
generic step loop), checkpoint.py (Orbax), metrics.py (JSONL + TensorBoard), commands.py
(`jaxalign train`), and the stage runners sft_stage.py / score_stage.py."""
