"""A fine-tuning run: its config and method table, the model and its inputs, the loop with its
checkpoints and processes, the run folder it writes, and using the result (export/apply)."""
