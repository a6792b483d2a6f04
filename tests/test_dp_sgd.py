"""Tests for fedjax_med.privacy.dp_sgd: per-example clipping, masking, noise and chunking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.privacy import dp_sgd


def linear_loss(params, example):
    """Squared error of a tiny linear model on ONE example."""
    pred = jnp.dot(params['w'], example['x']) + params['b']
    return 0.5 * (pred - example['y']) ** 2


def tiny_problem(batch=6, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    params = {'w': jnp.asarray(rng.normal(size=dim), jnp.float32), 'b': jnp.float32(0.3)}
    data = {
        'x': jnp.asarray(rng.normal(size=(batch, dim)) * 3, jnp.float32),
        'y': jnp.asarray(rng.normal(size=batch), jnp.float32),
    }
    return params, data


def test_clip_bounds_norms_and_leaves_small_examples_unchanged():
    rng = np.random.default_rng(1)
    scales = np.array([0.01, 0.1, 1.0, 10.0, 100.0, 0.0])
    grads = {
        'a': jnp.asarray(rng.normal(size=(6, 4, 3)) * scales[:, None, None], jnp.float32),
        'b': {'c': jnp.asarray(rng.normal(size=(6, 5)) * scales[:, None], jnp.float32)},
    }
    clip = 1.5
    clipped, norms = dp_sgd.clip_by_global_norm_per_example(grads, clip)

    flat = lambda t: np.concatenate(
        [np.asarray(x).reshape(6, -1) for x in jax.tree.leaves(t)], axis=1
    )
    expected_norms = np.linalg.norm(flat(grads), axis=1)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-6)
    clipped_norms = np.linalg.norm(flat(clipped), axis=1)
    assert np.all(clipped_norms <= clip + 1e-6)
    small = expected_norms < clip
    assert small.sum() >= 2 and (~small).sum() >= 2
    np.testing.assert_array_equal(flat(clipped)[small], flat(grads)[small])
    # Large ones are scaled to exactly C, in the same direction.
    np.testing.assert_allclose(clipped_norms[~small], clip, rtol=1e-5)
    direction = flat(grads)[~small] / expected_norms[~small, None]
    np.testing.assert_allclose(flat(clipped)[~small] / clip, direction, atol=1e-6)


def test_no_noise_huge_clip_equals_plain_masked_gradient():
    params, data = tiny_problem()
    mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)
    expected_batch_size = 3.5

    def masked_sum_loss(p):
        losses = jax.vmap(linear_loss, in_axes=(None, 0))(p, data)
        return jnp.sum(mask * losses)

    want = jax.tree.map(lambda g: g / expected_batch_size, jax.grad(masked_sum_loss)(params))
    got, aux = dp_sgd.dp_gradient(
        linear_loss,
        params,
        data,
        mask,
        jax.random.key(0),
        clip_norm=1e6,
        noise_multiplier=0.0,
        expected_batch_size=expected_batch_size,
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6)
    losses = jax.vmap(linear_loss, in_axes=(None, 0))(params, data)
    np.testing.assert_allclose(aux['loss'], np.sum(mask * losses) / 4, rtol=1e-6)
    assert aux['clip_fraction'] == 0.0


def test_masked_examples_contribute_nothing():
    params, data = tiny_problem()
    mask = jnp.array([1, 0, 1, 1, 0, 1], bool)
    kwargs = dict(clip_norm=1.0, noise_multiplier=0.7, expected_batch_size=4.0)
    key = jax.random.key(3)
    base, base_aux = dp_sgd.dp_gradient(linear_loss, params, data, mask, key, **kwargs)
    changed = {
        'x': data['x'].at[1].set(100.0).at[4].set(jnp.nan),
        'y': data['y'].at[1].set(-50.0).at[4].set(jnp.inf),
    }
    other, other_aux = dp_sgd.dp_gradient(linear_loss, params, changed, mask, key, **kwargs)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in base_aux:
        np.testing.assert_array_equal(base_aux[name], other_aux[name])


def test_aux_statistics_by_hand():
    params, data = tiny_problem()
    mask = np.array([1, 1, 0, 1, 1, 0], bool)
    grads = jax.vmap(jax.grad(linear_loss), in_axes=(None, 0))(params, data)
    norms = np.sqrt(np.sum(np.asarray(grads['w']) ** 2, axis=1) + np.asarray(grads['b']) ** 2)
    clip = float(np.median(norms[mask]))
    _, aux = dp_sgd.dp_gradient(
        linear_loss,
        params,
        data,
        jnp.asarray(mask),
        jax.random.key(0),
        clip_norm=clip,
        noise_multiplier=1.0,
        expected_batch_size=4.0,
    )
    np.testing.assert_allclose(aux['clip_fraction'], np.mean(norms[mask] > clip), rtol=1e-6)
    np.testing.assert_allclose(aux['grad_norm_mean'], np.mean(norms[mask]), rtol=1e-5)


@pytest.mark.parametrize('all_masked', [False, True])
def test_noise_std_is_noise_multiplier_times_clip(all_masked):
    dim = 100_000
    params = {'w': jnp.zeros((dim // 2,)), 'v': jnp.zeros((2, dim // 4))}
    data = {'x': jnp.ones((4, 2))}
    mask = jnp.zeros(4) if all_masked else jnp.ones(4)
    # all_masked: zero contribution by masking; otherwise the loss ignores the parameters.
    loss = lambda p, ex: jnp.sum(ex['x']) + 0.0 * (jnp.sum(p['w']) + jnp.sum(p['v']))
    z, clip, ebs = 1.3, 2.0, 5.0
    grads, _ = dp_sgd.dp_gradient(
        loss,
        params,
        data,
        mask,
        jax.random.key(42),
        clip_norm=clip,
        noise_multiplier=z,
        expected_batch_size=ebs,
    )
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(grads)])
    want_std = z * clip / ebs
    # Relative standard error of a sample std over 1e5 normals is 1/sqrt(2e5) ~ 0.22%: 2% is
    # ~9 standard errors, so this fails only if the scale is wrong.
    assert abs(flat.std() / want_std - 1) < 0.02
    assert abs(flat.mean()) < 5 * want_std / np.sqrt(dim)
    # Leaves get independent noise (key split per leaf), not the same draw.
    assert not np.allclose(np.asarray(grads['w'])[:10], np.asarray(grads['v']).ravel()[:10])


@pytest.mark.parametrize('chunk_size', [1, 2, 4, 5])
def test_chunked_equals_unchunked(chunk_size):
    params, data = tiny_problem(batch=10, seed=4)
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1, 0, 1], jnp.float32)
    kwargs = dict(clip_norm=2.0, noise_multiplier=0.9, expected_batch_size=7.0)
    key = jax.random.key(7)
    want, want_aux = dp_sgd.dp_gradient(linear_loss, params, data, mask, key, **kwargs)
    got, got_aux = jax.jit(
        lambda p, d, m, k: dp_sgd.dp_gradient(
            linear_loss, p, d, m, k, chunk_size=chunk_size, **kwargs
        )
    )(params, data, mask, key)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    for name in want_aux:
        np.testing.assert_allclose(got_aux[name], want_aux[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('hospitals_vmapped', [False, True])
def test_chunks_past_the_last_sampled_example_do_not_run(hospitals_vmapped):
    # A Poisson batch padded to 10 slots that drew 3 examples: with chunks of 2, only the first
    # two chunks hold sampled examples and only they are computed (each chunk's per-example
    # loss reports once); the result equals the unchunked one.
    calls = []

    def counting_loss(p, example):
        jax.debug.callback(lambda: calls.append(1))
        return linear_loss(p, example)

    params, data = tiny_problem(batch=10, seed=5)
    mask = jnp.zeros(10, bool).at[:3].set(True)
    kwargs = dict(clip_norm=2.0, noise_multiplier=0.9, expected_batch_size=3.0)
    key = jax.random.key(3)
    want, _ = dp_sgd.dp_gradient(linear_loss, params, data, mask, key, **kwargs)
    chunked = lambda m: dp_sgd.dp_gradient(
        counting_loss, params, data, m, key, chunk_size=2, **kwargs
    )[0]
    if hospitals_vmapped:  # two hospitals in one vmap run as many chunks as the longer needs
        other = jnp.zeros(10, bool).at[:5].set(True)
        got = jax.tree.map(lambda g: g[0], jax.jit(jax.vmap(chunked))(jnp.stack([mask, other])))
        expected_calls = 3
    else:
        got, expected_calls = jax.jit(chunked)(mask), 2
    jax.block_until_ready(got)
    assert len(calls) == expected_calls
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_invalid_chunk_size_raises():
    params, data = tiny_problem()
    with pytest.raises(ValueError, match='chunk_size'):
        dp_sgd.dp_gradient(
            linear_loss,
            params,
            data,
            jnp.ones(6),
            jax.random.key(0),
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=1.0,
            chunk_size=0,
        )
