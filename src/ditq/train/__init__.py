"""Training: EMA and the training loop."""
