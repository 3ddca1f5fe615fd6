"""Training: strategy and precision setup, optimizer and schedule, the loop, checkpoints."""
