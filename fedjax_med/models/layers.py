"""Shared building blocks: Conv, Dense and GroupNorm that can report what fast DP clipping needs.

The three layers have flax's parameter names, shapes and initialisers ('kernel', 'bias', 'scale'),
so parameter pytrees are exactly those of `nn.Conv`, `nn.Dense` and `nn.GroupNorm`. In addition,
when applied with the collections below requested, each layer records

* `dp_acts`: the activation its weight multiplies, with a leading example axis: the layer input
  for Conv/Dense, the normalised input x_hat for GroupNorm;
* `perturbations`: a zero added to its output (`Module.perturb`), so that the gradient of a
  summed loss with respect to it is each example's gradient at the layer output.

From those two, `fedjax_med.privacy.fast_clip` computes per-example gradient norms without ever
materialising per-example gradients. Neither collection is written during `init` (parameter
counts stay those of the plain layers) nor when not requested (`sow` and `perturb` are then
no-ops), so ordinary training pays nothing.

GroupNorm, never batch normalisation: that mixes the examples of a batch, which breaks
per-example DP, and its running statistics misbehave on non-IID data.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_med.models.conv import LoopFriendlyConv

DP_ACTS = 'dp_acts'  # collection of the activations fast clipping needs
PERTURBATIONS = 'perturbations'  # flax's default collection for `Module.perturb`
OUT = 'out'  # name of each layer's output perturbation

Dtype = Any


def _recorded(module: nn.Module, inputs: jax.Array, apply) -> jax.Array:
    """`apply(inputs)`, recording the input and perturbing the output (not during init)."""
    if module.is_initializing():
        return apply(inputs)
    module.sow(DP_ACTS, 'inputs', inputs)
    return module.perturb(OUT, apply(inputs))


class Dense(nn.Dense):
    """`nn.Dense` that records its input and perturbs its output for fast DP clipping."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _recorded(self, inputs, super().__call__)


class Conv(nn.Conv):
    """`nn.Conv` that records its input and perturbs its output for fast DP clipping.

    Its gradient is computed with forward-layout convolutions on CPU (`models/conv.py`), which
    keeps the local-step loop fast there; the numbers are those of `nn.Conv`.
    """

    conv_general_dilated_cls: Any = LoopFriendlyConv

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _recorded(self, inputs, super().__call__)


class GroupNorm(nn.Module):
    """Group normalisation over all non-example axes (Wu & He 2018), flax's parameters.

    Unlike `nn.GroupNorm` it exposes the normalised input x_hat (the gradient of 'scale' is
    sum_t x_hat * dL/dy). Statistics are computed in float32 with the two-pass variance.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None  # output dtype; None: promote the input with param_dtype
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f'GroupNorm: {channels} channels are not divisible into {self.num_groups} groups.'
            )
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
        axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)  # all but examples and groups
        centred = grouped - jnp.mean(grouped, axes, keepdims=True)
        var = jnp.mean(jnp.square(centred), axes, keepdims=True)
        x_hat = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = x_hat
        if self.use_scale:
            y = y * self.param('scale', self.scale_init, (channels,), self.param_dtype)
        if self.use_bias:
            y = y + self.param('bias', self.bias_init, (channels,), self.param_dtype)
        y = y.astype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))
        if self.is_initializing():
            return y
        self.sow(DP_ACTS, 'x_hat', x_hat.astype(y.dtype))
        return self.perturb(OUT, y)


def group_norm(
    channels: int, max_groups: int, dtype: Dtype = jnp.float32, **kwargs: Any
) -> GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`."""
    return GroupNorm(num_groups=math.gcd(channels, max_groups), dtype=dtype, **kwargs)


def activation(x: jax.Array, negative_slope: float) -> jax.Array:
    """ReLU (negative_slope = 0) or leaky ReLU: x for x >= 0, negative_slope * x below."""
    return nn.relu(x) if negative_slope == 0 else nn.leaky_relu(x, negative_slope)
