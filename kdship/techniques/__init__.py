"""Techniques that compose around the training step: reverse distillation and sample-value selection."""
