"""Backbones, MAML and baselines, test-time fine-tuning and checkpoints."""
