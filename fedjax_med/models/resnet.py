"""ResNets with GroupNorm for multi-label chest X-ray classification.

`ResNet(stage_sizes=(2, 2, 2, 2), width=64)` is ResNet-18 (He et al. 2016, basic blocks) with every
batch normalisation replaced by GroupNorm, the usual choice for DP-SGD and federated training.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedjax_med.models.layers import Conv, Dense, activation, group_norm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection when the shape changes)."""

    features: int
    strides: int = 1
    norm_groups: int = 32
    dtype: jnp.dtype = jnp.float32
    negative_slope: float = 0.0  # 0: ReLU; > 0: leaky ReLU

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, name: Conv(
            f, (k, k), (s, s), padding='SAME', use_bias=False, dtype=self.dtype, name=name
        )
        # The norms' names (no GroupNorm_1) are those of earlier checkpoints and parameter trees.
        norm = lambda name, **kw: group_norm(
            self.features, self.norm_groups, self.dtype, name=name, **kw
        )
        y = conv(self.features, 3, self.strides, 'conv1')(x)
        y = activation(norm('GroupNorm_0')(y), self.negative_slope)
        y = conv(self.features, 3, 1, 'conv2')(y)
        # Zero-init the last norm's scale so each block starts as the identity (Goyal et al. 2017).
        y = norm('GroupNorm_2', scale_init=nn.initializers.zeros)(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, 'proj')(x)
            x = norm('GroupNorm_3')(x)
        return activation(x + y, self.negative_slope)


class ResNet(nn.Module):
    """GroupNorm ResNet returning `num_outputs` logits."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    num_outputs: int = 14
    norm_groups: int = 32
    stem_stride: int = 2  # 1 for small inputs (CPU configs at 32-64 px)
    dtype: jnp.dtype = jnp.float32
    negative_slope: float = 0.0  # 0: ReLU; > 0: leaky ReLU

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train  # GroupNorm behaves the same in training and evaluation
        x = x.astype(self.dtype)
        if self.stem_stride > 1:
            x = Conv(
                self.width,
                (7, 7),
                (2, 2),
                padding='SAME',
                use_bias=False,
                dtype=self.dtype,
                name='stem',
            )(x)
            x = activation(
                group_norm(self.width, self.norm_groups, self.dtype)(x), self.negative_slope
            )
            x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
        else:
            x = Conv(
                self.width, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype, name='stem'
            )(x)
            x = activation(
                group_norm(self.width, self.norm_groups, self.dtype)(x), self.negative_slope
            )
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(
                    self.width * 2**i, strides, self.norm_groups, self.dtype, self.negative_slope
                )(x)
        x = jnp.mean(x, axis=(-3, -2))
        return Dense(self.num_outputs, dtype=jnp.float32, name='head')(x).astype(jnp.float32)
