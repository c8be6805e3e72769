"""Trainer: RL losses and SFT with PyTorch + transformers, publishes weights."""
