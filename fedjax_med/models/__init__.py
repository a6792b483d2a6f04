"""Flax models and a plain registry: `build_model(config.model, task)` -> flax module."""

import jax.numpy as jnp
import ml_collections

from fedjax_med.models.resnet import ResNet
from fedjax_med.models.unet import UNet

NUM_OUTPUTS = {'chestxray14': 14, 'brats': 3}


def _resnet18(mc, num_outputs, dtype):
    return ResNet(
        (2, 2, 2, 2),
        64,
        num_outputs,
        mc.norm_groups,
        stem_stride=2,
        dtype=dtype,
        negative_slope=mc.negative_slope,
    )


def _resnet_small(mc, num_outputs, dtype):
    return ResNet(
        (1,) * mc.depth,
        mc.width,
        num_outputs,
        mc.norm_groups,
        stem_stride=1,
        dtype=dtype,
        negative_slope=mc.negative_slope,
    )


def _unet(mc, num_outputs, dtype):
    return UNet(
        mc.width,
        mc.depth,
        num_outputs,
        mc.norm_groups,
        dtype=dtype,
        negative_slope=mc.negative_slope,
    )


MODELS = {'resnet18': _resnet18, 'resnet_small': _resnet_small, 'unet': _unet}
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(model_config: ml_collections.ConfigDict, task: str):
    """Returns the Flax module named by `model_config.name` for `task`."""
    dtype = COMPUTE_DTYPES[model_config.compute_dtype]
    return MODELS[model_config.name](model_config, NUM_OUTPUTS[task], dtype)
