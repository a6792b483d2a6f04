"""Update compression: quantisation, Hadamard rotation, top-k error feedback, byte counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.aggregation import compression


def _params():
    return {'w': jnp.zeros((3, 5)), 'b': jnp.zeros((7,))}


def test_quantization_is_unbiased_and_on_the_grid():
    x = {'a': jnp.array([0.0, 0.13, 0.5, 0.77, 1.0]), 'b': jnp.array([[-2.0, 1.1], [3.0, 0.4]])}
    keys = jax.random.split(jax.random.key(0), 4000)
    q = jax.vmap(lambda k: compression.stochastic_quantize(x, k, bits=2))(keys)
    # 2 bits over [0, 1]: the grid is {0, 1/3, 2/3, 1}.
    grid = np.asarray(q['a']) * 3
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-5)
    for name in x:
        np.testing.assert_allclose(q[name].mean(0), x[name], atol=0.02)
        assert np.all(q[name] >= x[name].min() - 1e-6) and np.all(q[name] <= x[name].max() + 1e-6)
    # Round-to-nearest would be biased: 0.13 -> 0.
    assert abs(float(q['a'][:, 1].mean()) - 0.13) < 0.02


def test_quantization_of_constant_leaf_is_exact():
    x = {'c': jnp.full((4,), 2.5)}
    np.testing.assert_array_equal(
        compression.stochastic_quantize(x, jax.random.key(0), bits=4)['c'], x['c']
    )


def test_hadamard_is_orthonormal_and_inverse_exact():
    x = {'w': jax.random.normal(jax.random.key(1), (3, 5)), 'b': jnp.arange(8.0)}
    key = jax.random.key(2)
    rotated = compression.randomized_hadamard(x, key)
    assert rotated['w'].shape == (16,) and rotated['b'].shape == (8,)
    for name in x:
        np.testing.assert_allclose(
            jnp.linalg.norm(rotated[name]), jnp.linalg.norm(x[name]), rtol=1e-5
        )
    back = compression.inverse_randomized_hadamard(rotated, key, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, x)
    # Rotation spreads a spike over all coordinates.
    spike = compression.randomized_hadamard({'s': jnp.eye(1, 16)[0] * 4.0}, key)['s']
    np.testing.assert_allclose(jnp.abs(spike), 1.0, rtol=1e-6)


def test_topk_error_feedback_keeps_what_it_does_not_send():
    comp = compression.topk_error_feedback(0.2)
    update = {'w': jnp.array([0.1, -3.0, 0.2, 0.05, 1.0, -0.4, 0.3, 0.0, 0.6, -0.7])}
    residual = comp.init(update)
    np.testing.assert_array_equal(residual['w'], 0.0)
    residual = {'w': residual['w'].at[0].set(5.0)}
    sent, new_residual = comp.apply(update, residual, None)
    np.testing.assert_allclose(
        sent['w'], [5.1, -3.0, 0, 0, 0, 0, 0, 0, 0, 0], rtol=1e-6
    )  # top 2 of update + residual
    np.testing.assert_allclose(new_residual['w'] + sent['w'], update['w'] + residual['w'])


def test_topk_error_feedback_converges_on_a_quadratic():
    # f(w) = 0.5 * sum(a * (w - w*)^2); 5% of coordinates per step.
    dim = 200
    a = jnp.linspace(0.5, 2.0, dim)
    target = jax.random.normal(jax.random.key(3), (dim,))
    comp = compression.compressor('topk', topk_fraction=0.05)

    def step(carry, _):
        w, state = carry
        sent, state = comp.apply({'w': a * (w - target)}, state, jax.random.key(0))
        return (w - 0.05 * sent['w'], state), None

    w0 = jnp.zeros(dim)
    (w, _), _ = jax.lax.scan(step, (w0, comp.init({'w': w0})), None, length=500)
    assert float(jnp.linalg.norm(w - target)) < 1e-3 * float(jnp.linalg.norm(target))

    # Without the residual the same budget stays far from the optimum.
    def step_without_feedback(w, _):
        sent, _ = comp.apply({'w': a * (w - target)}, comp.init({'w': w}), jax.random.key(0))
        return w - 0.05 * sent['w'], None

    w, _ = jax.lax.scan(step_without_feedback, w0, None, length=500)
    assert float(jnp.linalg.norm(w - target)) > 0.05 * float(jnp.linalg.norm(target))


@pytest.mark.parametrize('rotate', [False, True])
def test_quantize_compressor_vmapped_over_clients(rotate):
    comp = compression.compressor('quantize', bits=4, rotate=rotate)
    num_clients = 3
    updates = {
        'w': jax.random.normal(jax.random.key(4), (num_clients, 3, 5)),
        'b': jax.random.normal(jax.random.key(5), (num_clients, 7)),
    }
    state = jax.vmap(comp.init)(updates)
    keys = jax.random.split(jax.random.key(6), num_clients)
    out, _ = jax.jit(jax.vmap(comp.apply))(updates, state, keys)
    jax.tree.map(lambda o, u: np.testing.assert_equal(o.shape, u.shape), out, updates)
    # Unbiased over many keys, also through the rotation.
    many = jax.jit(jax.vmap(lambda k: comp.apply(jax.tree.map(lambda x: x[0], updates), (), k)[0]))(
        jax.random.split(jax.random.key(7), 3000)
    )
    for name in updates:
        np.testing.assert_allclose(many[name].mean(0), updates[name][0], atol=0.05)


def test_none_compressor_is_identity():
    comp = compression.compressor('none')
    update = {'w': jnp.arange(3.0)}
    out, state = comp.apply(update, comp.init(update), jax.random.key(0))
    np.testing.assert_array_equal(out['w'], update['w'])
    assert state == ()


def test_bytes_per_update_hand_computed():
    params = _params()  # leaves of 15 and 7 parameters
    count = compression.bytes_per_update
    assert count(params, kind='none') == 4 * 22
    assert count(params, kind='quantize', bits=8) == (15 + 8) + (7 + 8)
    assert count(params, kind='quantize', bits=3) == (6 + 8) + (3 + 8)  # ceil(45/8), ceil(21/8)
    assert count(params, kind='quantize', bits=8, rotate=True) == (16 + 8) + (8 + 8)
    assert count(params, kind='topk', topk_fraction=0.1) == (2 + 1) * 8  # ceil(1.5), ceil(0.7)
    assert count(params, kind='topk', topk_fraction=1.0) == 22 * 8
    assert compression.broadcast_bytes(params) == 88
    assert compression.broadcast_bytes(params, jnp.bfloat16) == 44


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match='compression.kind'):
        compression.compressor('gzip')
    with pytest.raises(ValueError, match='rotate'):
        compression.compressor('topk', rotate=True)
    with pytest.raises(ValueError, match='topk_fraction'):
        compression.compressor('topk', topk_fraction=0.0)
    with pytest.raises(ValueError, match='bits'):
        compression.compressor('quantize', bits=0)
