"""Training: optimizer and schedules, the pure step, the sharded state, evaluation, the loop,
checkpoints, metrics and the run directory."""
