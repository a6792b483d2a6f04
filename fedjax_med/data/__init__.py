"""Datasets (TFDS builders, synthetic twins), hospital partitions and client batching."""
