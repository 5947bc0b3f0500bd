"""Distillation losses, chunked over tokens so full logits are never held."""
