"""2-D U-Net with GroupNorm for BraTS segmentation.

Outputs three logits per pixel, one per nested region (whole tumour, tumour core, enhancing
tumour); each goes through its own sigmoid, because the regions overlap (ET within TC within WT).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models.layers import Conv, group_norm


class ConvBlock(nn.Module):
    """(3x3 conv, GroupNorm, ReLU) twice."""

    features: int
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = Conv(self.features, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype)(x)
            x = nn.relu(group_norm(self.features, self.norm_groups, self.dtype)(x))
        return x


class UNet(nn.Module):
    """U-Net with `depth` resolution levels; channels double at each level down."""

    width: int = 32
    depth: int = 4
    num_outputs: int = 3
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth - 1):
            x = ConvBlock(self.width * 2**level, self.norm_groups, self.dtype)(x)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = ConvBlock(self.width * 2 ** (self.depth - 1), self.norm_groups, self.dtype)(x)
        for level in reversed(range(self.depth - 1)):
            skip = skips[level]
            x = jax.image.resize(x, (*x.shape[:-3], *skip.shape[-3:-1], x.shape[-1]), 'nearest')
            x = ConvBlock(self.width * 2**level, self.norm_groups, self.dtype)(
                jnp.concatenate([x, skip], axis=-1))
        return Conv(self.num_outputs, (1, 1), dtype=jnp.float32, name='head')(x).astype(
            jnp.float32)
