"""Training loops and their infrastructure: run folders, checkpoints, logs, distributed set-up."""
