"""Shared building blocks: GroupNorm sized to the channel count (never BatchNorm: it mixes
examples, which breaks per-example DP, and its running statistics misbehave on non-IID data)."""

import math

import flax.linen as nn
import jax.numpy as jnp


def group_norm(channels: int, max_groups: int, dtype=jnp.float32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(num_groups=groups, dtype=dtype)
