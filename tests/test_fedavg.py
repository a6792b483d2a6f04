"""FedAvg aggregation and the server optimisers on hand-made pytrees with exact values."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from fedjax_med.aggregation import fedavg, server_opt


def test_weighted_mean_hand_values():
    stacked = {
        'w': jnp.array([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]),
        'b': jnp.array([1.0, 2, 9]),
    }
    weights = jnp.array([1.0, 3.0, 0.0])  # third hospital does not take part
    out = fedavg.weighted_mean(stacked, weights)
    np.testing.assert_allclose(out['w'], [(1 + 9) / 4, (2 + 12) / 4])
    np.testing.assert_allclose(out['b'], (1 + 6) / 4)


def test_aggregator_weights():
    n = jnp.array([10.0, 30.0, 60.0])
    part = jnp.array([1.0, 1.0, 0.0])
    np.testing.assert_allclose(fedavg.aggregator('weighted').weights(n, part), [10, 30, 0])
    np.testing.assert_allclose(fedavg.aggregator('uniform').weights(n, part), [1, 1, 0])
    stacked = {'w': jnp.array([2.0, 4.0, 8.0])}
    out = fedavg.weighted_mean(stacked, fedavg.aggregator('uniform').weights(n, part))
    np.testing.assert_allclose(out['w'], 3.0)


def _server_config(name, lr=0.5):
    sc = base.get_base_config().server
    sc.optimizer, sc.learning_rate = name, lr
    return sc


def _reference(name, sc: ml_collections.ConfigDict, x, deltas):
    """Hand-written server optimisers (Reddi et al. 2021, in optax's exact form)."""
    lr, b1, b2, eps = sc.learning_rate, sc.beta1, sc.beta2, sc.epsilon
    m = v = np.zeros_like(x)
    if name == 'fedyogi':
        m = v = np.full_like(x, 1e-6)  # optax's Yogi starts both moments at 1e-6
    for t, d in enumerate(deltas, start=1):
        g = -d
        if name == 'fedavg':
            x = x - lr * g
        elif name == 'fedavgm':
            m = sc.momentum * m + g
            x = x - lr * m
        elif name == 'fedadam':
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g**2
            x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        elif name == 'fedyogi':
            m = b1 * m + (1 - b1) * g
            v = v - (1 - b2) * np.sign(v - g**2) * g**2
            x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        elif name == 'fedadagrad':
            v = v + g**2
            x = x - lr * g / np.sqrt(v + eps)
    return x


@pytest.mark.parametrize('name', server_opt.SERVER_OPTIMIZERS)
def test_server_optimizers_match_reference_for_two_rounds(name):
    sc = _server_config(name)
    opt = server_opt.server_optimizer(sc)
    x0 = np.array([1.0, -2.0, 0.5], np.float32)
    deltas = [np.array([0.1, -0.3, 0.2], np.float32), np.array([-0.2, 0.1, 0.4], np.float32)]
    params, state = {'w': jnp.asarray(x0)}, opt.init({'w': jnp.asarray(x0)})
    for d in deltas:
        params, state = server_opt.server_step(opt, params, state, {'w': jnp.asarray(d)})
    np.testing.assert_allclose(
        params['w'], _reference(name, sc, x0.astype(np.float64), deltas), rtol=1e-5, atol=1e-6
    )


def test_fedavg_with_server_lr_one_adds_the_mean_update():
    opt = server_opt.server_optimizer(_server_config('fedavg', 1.0))
    params = {'w': jnp.array([1.0, 2.0])}
    new, _ = server_opt.server_step(opt, params, opt.init(params), {'w': jnp.array([0.5, -1.0])})
    np.testing.assert_allclose(new['w'], [1.5, 1.0])


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="config.server.optimizer='fedsgd'"):
        server_opt.server_optimizer(_server_config('fedsgd'))
