"""U-Net with GroupNorm for BraTS segmentation, 2-D (axial slices) or 3-D (patches).

The spatial rank comes from the input: images [B, H, W, C] give a 2-D U-Net (3x3 convolutions,
2x2 pooling), patches [B, D, H, W, C] a 3-D one (3x3x3 convolutions, 2x2x2 pooling). The parameter
tree has the same names either way; only the kernels gain a dimension.

Outputs three logits per pixel (voxel), one per nested region (whole tumour, tumour core,
enhancing tumour); each goes through its own sigmoid, because the regions overlap (ET within TC
within WT).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models.layers import Conv, activation, group_norm

SPATIAL_DIMS = (2, 3)  # 2-D slices or 3-D patches


class ConvBlock(nn.Module):
    """(3x3 or 3x3x3 conv, GroupNorm, (leaky) ReLU) twice."""

    features: int
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32
    negative_slope: float = 0.0

    @nn.compact
    def __call__(self, x):
        kernel = (3,) * (x.ndim - 2)
        for _ in range(2):
            x = Conv(self.features, kernel, padding='SAME', use_bias=False, dtype=self.dtype)(x)
            x = activation(
                group_norm(self.features, self.norm_groups, self.dtype)(x), self.negative_slope
            )
        return x


class UNet(nn.Module):
    """U-Net with `depth` resolution levels; channels double at each level down.

    Takes [B, H, W, C] (2-D) or [B, D, H, W, C] (3-D); every spatial side must be divisible by
    2**(depth - 1).
    """

    width: int = 32
    depth: int = 4
    num_outputs: int = 3
    norm_groups: int = 8
    dtype: jnp.dtype = jnp.float32
    # 0: ReLU. The BraTS configs use leaky ReLUs (0.1): with ReLUs a U-Net can code tumour as all
    # last-level features switched off, which caps its tumour logits at the head's bias and
    # leaves no gradient to switch them on (configs/brats.py, RESULTS.md).
    negative_slope: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        nd = x.ndim - 2
        if nd not in SPATIAL_DIMS:
            raise ValueError(
                f'UNet takes [B, H, W, C] or [B, D, H, W, C] inputs, got shape '
                f'{x.shape}; add the batch axis (x[None]) for a single example.'
            )
        window = (2,) * nd
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth - 1):
            x = ConvBlock(self.width * 2**level, self.norm_groups, self.dtype, self.negative_slope)(
                x
            )
            skips.append(x)
            x = nn.max_pool(x, window, window)
        x = ConvBlock(
            self.width * 2 ** (self.depth - 1), self.norm_groups, self.dtype, self.negative_slope
        )(x)
        for level in reversed(range(self.depth - 1)):
            skip = skips[level]
            x = jax.image.resize(x, (*skip.shape[:-1], x.shape[-1]), 'nearest')
            x = ConvBlock(self.width * 2**level, self.norm_groups, self.dtype, self.negative_slope)(
                jnp.concatenate([x, skip], axis=-1)
            )
        return Conv(self.num_outputs, (1,) * nd, dtype=jnp.float32, name='head')(x).astype(
            jnp.float32
        )
