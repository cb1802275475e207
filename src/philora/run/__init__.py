"""A training run: the loop, checkpoints and exact resume, torchrun, signals, the run lock,
metrics and trackers, the optimizer."""
