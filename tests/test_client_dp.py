"""Tests for fedjax_med.privacy.client_dp: DP-FedAvg clipping, noised mean, adaptive clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.privacy import client_dp


def stacked_deltas(num_clients=5, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([0.1, 0.5, 2.0, 5.0, 20.0])[:num_clients]
    return {
        'dense': {'w': jnp.asarray(rng.normal(size=(num_clients, 3, 2)) * scales[:, None, None])},
        'bias': jnp.asarray(rng.normal(size=(num_clients, 2)) * scales[:, None]),
    }


def client_norms(tree):
    flat = np.concatenate(
        [np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1
    )
    return np.linalg.norm(flat, axis=1)


def test_clip_client_updates_bounds_norms():
    deltas = stacked_deltas()
    clipped, norms = client_dp.clip_client_updates(deltas, 1.0)
    np.testing.assert_allclose(norms, client_norms(deltas), rtol=1e-6)
    assert np.all(client_norms(clipped) <= 1.0 + 1e-6)
    small = client_norms(deltas) < 1.0
    assert small.any() and (~small).any()
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(deltas), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[small], np.asarray(b)[small])


def test_noised_mean_without_noise_is_scaled_uniform_mean():
    deltas = stacked_deltas()
    clipped, _ = client_dp.clip_client_updates(deltas, 3.0)
    participating = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
    expected_clients = 4.0
    mean = client_dp.noised_mean(
        clipped,
        participating,
        jax.random.key(0),
        clip_norm=3.0,
        noise_multiplier=0.0,
        expected_clients=expected_clients,
    )
    on = np.asarray(participating) > 0
    for got, leaf in zip(jax.tree.leaves(mean), jax.tree.leaves(clipped), strict=True):
        uniform_mean = np.asarray(leaf)[on].mean(axis=0)
        np.testing.assert_allclose(got, uniform_mean * on.sum() / expected_clients, rtol=1e-6)


def test_noised_mean_ignores_absent_clients_and_noise_scale():
    deltas = stacked_deltas()
    participating = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0])
    kwargs = dict(clip_norm=1.0, noise_multiplier=0.8, expected_clients=2.0)
    key = jax.random.key(1)
    base = client_dp.noised_mean(deltas, participating, key, **kwargs)
    changed = jax.tree.map(lambda x: x.at[1].set(1e3).at[4].set(-1e3), deltas)
    other = client_dp.noised_mean(changed, participating, key, **kwargs)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)

    big = {'w': jnp.zeros((3, 60_000))}
    noise = client_dp.noised_mean(
        big,
        jnp.ones(3),
        jax.random.key(2),
        clip_norm=2.0,
        noise_multiplier=1.5,
        expected_clients=3.0,
    )['w']
    # Relative standard error of the sample std is ~0.3%; 2% is a sound bound.
    assert abs(float(noise.std()) / (1.5 * 2.0 / 3.0) - 1) < 0.02


def test_adaptive_clip_moves_towards_target_quantile():
    participating = jnp.ones(4)
    kwargs = dict(target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0, expected_clients=4.0)
    key = jax.random.key(0)
    up = client_dp.adaptive_clip_update(
        1.0, jnp.array([2.0, 3.0, 4.0, 5.0]), participating, key, **kwargs
    )
    down = client_dp.adaptive_clip_update(
        1.0, jnp.array([0.1, 0.2, 0.3, 0.4]), participating, key, **kwargs
    )
    # All clipped: b_hat = 0 -> C exp(0.2 * 0.5); none clipped: b_hat = 1 -> C exp(-0.1).
    np.testing.assert_allclose(up, math.exp(0.1), rtol=1e-6)
    np.testing.assert_allclose(down, math.exp(-0.1), rtol=1e-6)
    half = client_dp.adaptive_clip_update(
        1.0, jnp.array([0.5, 0.5, 2.0, 2.0]), participating, key, **kwargs
    )
    np.testing.assert_allclose(half, 1.0, rtol=1e-6)


def test_adaptive_clip_count_noise_and_absent_clients():
    norms = jnp.array([0.1, 0.1, 5.0, 5.0])
    participating = jnp.array([1.0, 1.0, 0.0, 0.0])
    kwargs = dict(target_quantile=0.5, learning_rate=1.0, expected_clients=2.0)
    # Absent clients do not vote: both participants are unclipped -> b_hat = 1 -> C e^-0.5.
    quiet = client_dp.adaptive_clip_update(
        1.0, norms, participating, jax.random.key(0), count_noise_std=0.0, **kwargs
    )
    np.testing.assert_allclose(quiet, math.exp(-0.5), rtol=1e-6)
    keys = jax.random.split(jax.random.key(0), 4000)
    noisy = jax.vmap(
        lambda k: client_dp.adaptive_clip_update(
            1.0, norms, participating, k, count_noise_std=0.4, **kwargs
        )
    )(keys)
    log_c = np.log(np.asarray(noisy))  # = -(b_hat - 0.5), b_hat ~ N(1, (0.4 / 2)^2)
    assert abs(log_c.mean() + 0.5) < 0.02
    assert abs(log_c.std() - 0.2) < 0.01


def test_effective_noise_multiplier():
    # z = 1, sigma_b = 1: (1 - 1/4)^(-1/2) = 2 / sqrt(3).
    assert client_dp.effective_noise_multiplier(1.0, 1.0) == pytest.approx(2 / math.sqrt(3))
    assert client_dp.effective_noise_multiplier(1.0, math.inf) == pytest.approx(1.0)
    assert client_dp.effective_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match='count_noise_std=0.5'):
        client_dp.effective_noise_multiplier(1.0, 0.5)


def test_distributed_noise_std_sums_to_central_noise():
    per_client = client_dp.distributed_noise_std(1.2, 0.5, 9)
    assert per_client == pytest.approx(1.2 * 0.5 / 3)
    assert 9 * per_client**2 == pytest.approx((1.2 * 0.5) ** 2)
    with pytest.raises(ValueError):
        client_dp.distributed_noise_std(1.0, 1.0, 0)
    # The clip norm may be traced (adaptive clipping inside the jitted round).
    traced = jax.jit(lambda c: client_dp.distributed_noise_std(1.2, c, 9.0))(jnp.float32(0.5))
    np.testing.assert_allclose(traced, per_client, rtol=1e-6)
