"""Distillation stages: pre-training (this version), in-training and post-training (later)."""
