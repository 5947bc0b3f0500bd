"""Data path: corpus readers, Megatron indexed datasets, packing and collation."""
