"""2-D convolution whose gradient is computed with forward-layout convolutions.

XLA:CPU runs the convolutions that autodiff emits for a gradient (input gradient: transposed
kernel; kernel gradient: batch and feature dimensions swapped) up to 30x slower inside loop
bodies, such as our `lax.scan` over local steps, than outside them (jax-ml/jax#12868). This
module gives the same mathematics as `lax.conv_general_dilated` with a custom VJP that writes
both gradients as ordinary NHWC x HWIO -> NHWC convolutions (plus explicit transposes), which run
at full speed in loops. On GPUs the numbers are identical; only the CPU schedule changes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

DIMS = ('NHWC', 'HWIO', 'NHWC')


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/Flax 'SAME' padding for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x, k, strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
    return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC x HWIO convolution with explicit (low, high) padding per spatial dimension."""
    return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    out_h, out_w = g.shape[1:3]
    # Input gradient: the stride-dilated output gradient convolved with the flipped kernel whose
    # input and output channels are swapped.
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    pads = []
    for n, m, k, s, (lo, _) in zip(x.shape[1:3], (out_h, out_w), (kh, kw), strides, padding,
                                   strict=True):
        new_lo = k - 1 - lo
        pads.append((new_lo, n - ((m - 1) * s + 1) - new_lo + k - 1))
    dx = _conv(g.astype(x.dtype), flipped.astype(x.dtype), (1, 1), pads, lhs_dilation=strides)
    # Kernel gradient: input channels act as the batch, the batch as input channels, and the
    # output gradient (dilated by the stride) as the kernel.
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).transpose(3, 1, 2, 0)
    dk = _conv(xp, g.astype(x.dtype).transpose(1, 2, 0, 3), (1, 1), 'VALID',
               rhs_dilation=strides)
    dk = dk[:, :kh, :kw, :].transpose(1, 2, 0, 3)
    return dx, dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """Drop-in for `flax.linen.Conv` (NHWC, 'SAME' or 'VALID', params 'kernel' HWIO and 'bias')
    that uses `conv2d`, so its gradient runs fast inside loops on CPU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = 'SAME'
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: object = None

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        init = self.kernel_init or nn.initializers.lecun_normal()
        kernel = self.param('kernel', init, (kh, kw, x.shape[-1], self.features))
        if self.padding == 'SAME':
            pad = tuple(same_padding(n, k, s) for n, k, s in
                        zip(x.shape[-3:-1], self.kernel_size, self.strides, strict=True))
        else:
            pad = ((0, 0), (0, 0))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        batch_shape = x.shape[:-3]
        y = conv2d(x.reshape(-1, *x.shape[-3:]), kernel, tuple(self.strides), pad)
        y = y.reshape(*batch_shape, *y.shape[1:])
        if self.use_bias:
            y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
