"""2-D convolution whose gradient is computed with forward-layout convolutions.

XLA:CPU runs the convolutions that autodiff emits for a gradient (input gradient: transposed
kernel; kernel gradient: batch and feature dimensions swapped) up to 30x slower inside loop
bodies, such as our `lax.scan` over local steps, than outside them (jax-ml/jax#12868). This
module gives the same mathematics as `lax.conv_general_dilated` with a custom VJP that writes
both gradients as ordinary NHWC x HWIO -> NHWC convolutions (plus explicit transposes), which run
at full speed in loops. On GPUs the numbers are identical; only the CPU schedule changes.
"""

import functools

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


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` that takes `conv2d` for plain NHWC convolutions on CPU."""
    plain = (jax.default_backend() == 'cpu' and lhs.ndim == 4 and feature_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMS)
             and preferred_element_type is None)
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    if isinstance(padding, str):
        if padding == 'SAME':
            padding = [same_padding(n, k, s) for n, k, s in
                       zip(lhs.shape[1:3], rhs.shape[:2], window_strides, strict=True)]
        else:  # 'VALID'
            padding = [(0, 0), (0, 0)]
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv2d(lhs, rhs, tuple(int(s) for s in window_strides), padding)


class LoopFriendlyConv:
    """For `nn.Conv(conv_general_dilated_cls=LoopFriendlyConv)`: flax instantiates it and calls
    the instance like `lax.conv_general_dilated`."""

    def __call__(self, *args, **kwargs):
        return conv_general_dilated(*args, **kwargs)
