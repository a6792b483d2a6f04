"""Model options: the activations' negative slope reaches both models and is validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import brats, chestxray14
from fedjax_med.models import build_model
from fedjax_med.models.layers import activation
from fedjax_med.validate import validate


def test_activation_is_relu_at_zero_slope_and_leaky_above():
    x = jnp.array([-2.0, -0.5, 0.0, 3.0])
    np.testing.assert_array_equal(activation(x, 0.0), [0.0, 0.0, 0.0, 3.0])
    np.testing.assert_allclose(activation(x, 0.1), [-0.2, -0.05, 0.0, 3.0], rtol=1e-7)


@pytest.mark.parametrize('config_module', [brats, chestxray14])
def test_negative_slope_changes_the_model_and_nothing_else(config_module):
    """Same parameters (the slope adds none); outputs differ only when the slope does."""
    c = config_module.get_config('smoke')
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4 if c.task == 'brats' else 1))
    outputs, trees = [], []
    for slope in (0.0, 0.1):
        c.model.negative_slope = slope
        model = build_model(c.model, c.task)
        params = model.init(jax.random.key(1), x)
        trees.append(jax.tree.map(np.shape, params))
        outputs.append(np.asarray(model.apply(params, x)))
    assert trees[0] == trees[1]
    assert not np.allclose(outputs[0], outputs[1])


def test_brats_configs_use_leaky_relus_and_chest_xray_plain_relus():
    assert brats.get_config('synthetic').model.negative_slope == 0.1
    assert brats.get_config('').model.negative_slope == 0.1
    assert chestxray14.get_config('synthetic').model.negative_slope == 0.0


def test_a_negative_slope_outside_zero_to_one_is_a_clear_error():
    c = brats.get_config('smoke')
    c.model.negative_slope = 1.5
    with pytest.raises(ValueError, match=r'config.model.negative_slope=1.5 must be in \[0, 1\)'):
        validate(c)
