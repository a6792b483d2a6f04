"""Device side of secure aggregation (aggregation/secure.py): encoding, masks, sums, unmasking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_med.aggregation import secure

# Jitted once per shape: eager fori_loops would recompile on every call.
mask_updates = jax.jit(secure.mask_updates)
unmask = jax.jit(secure.unmask)


def _signs(num_clients: int, members: np.ndarray | None = None) -> np.ndarray:
    """Complete-graph signs (+1 if u < v, -1 if u > v) restricted to `members`."""
    idx = np.arange(num_clients)
    signs = np.sign(idx[None, :] - idx[:, None]).astype(np.int32)
    if members is not None:
        signs = signs * members[:, None] * members[None, :]
    return signs.astype(np.int32)


def _keys(num_clients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pair = rng.integers(0, 2**32, (num_clients, num_clients, 2), dtype=np.uint64).astype(np.uint32)
    pair = np.where(
        np.triu(np.ones((num_clients, num_clients), bool))[..., None], pair, pair.transpose(1, 0, 2)
    )
    self_keys = rng.integers(0, 2**32, (num_clients, 2), dtype=np.uint64).astype(np.uint32)
    return pair, self_keys


def _random_u32(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)


def _tree(num_clients: int, seed: int = 0) -> dict:
    return {
        'w': jnp.asarray(_random_u32((num_clients, 3, 4), seed)),
        'b': jnp.asarray(_random_u32((num_clients, 5), seed + 1)),
    }


def _like(stacked: dict) -> dict:
    return jax.tree.map(lambda x: x[0], stacked)


@pytest.mark.parametrize('num_clients', [1, 2, 7, 100, 1000, 10**6])
@pytest.mark.parametrize('clip', [1e-3, 1.0, 37.5])
def test_scale_leaves_int32_headroom(num_clients, clip):
    scale = secure.scale_for(clip, num_clients)
    assert num_clients * (clip * scale + 1) < 2**31
    # Encoding the extremes stays within c*Q + 1 levels.
    x = {'x': jnp.array([-10 * clip, -clip, clip, 10 * clip], jnp.float32)}
    levels = jax.lax.bitcast_convert_type(
        secure.encode(x, jax.random.key(0), clip=clip, scale=scale)['x'], jnp.int32
    )
    assert np.all(np.abs(np.asarray(levels, np.int64)) <= clip * scale + 1)


def test_config_scale_and_bits():
    assert secure.SecAggConfig(clip=2.0, num_clients=8).scale == secure.scale_for(2.0, 8)
    with pytest.raises(ValueError, match='bits'):
        _ = secure.SecAggConfig(clip=2.0, num_clients=8, bits=16).scale


def test_pairwise_masks_cancel():
    num_clients = 5
    pair, self_keys = _keys(num_clients)
    signs = _signs(num_clients)
    like = _like(_tree(num_clients))
    masks = [secure.client_masks(u, pair, signs, self_keys, like) for u in range(num_clients)]
    total = jax.tree.map(lambda *m: jnp.sum(jnp.stack(m), axis=0, dtype=jnp.uint32), *masks)
    self_total = jax.tree.map(
        lambda *m: jnp.sum(jnp.stack(m), axis=0, dtype=jnp.uint32),
        *[secure.expand_mask(self_keys[u], like) for u in range(num_clients)],
    )
    for leaf in jax.tree.leaves(jax.tree.map(jnp.subtract, total, self_total)):
        np.testing.assert_array_equal(leaf, 0)
    # ... and each mask on its own is far from zero.
    assert np.mean(np.asarray(masks[0]['w']) == 0) < 0.1


def test_masked_sum_minus_self_masks_is_plain_sum():
    num_clients = 4
    pair, self_keys = _keys(num_clients, seed=1)
    signs = _signs(num_clients)
    encoded = _tree(num_clients, seed=2)
    masked = mask_updates(encoded, pair, signs, self_keys)
    total = secure.masked_sum(masked, jnp.ones(num_clients))
    unmasked = unmask(
        total,
        survivor=jnp.ones(num_clients),
        recovered_self_keys=self_keys,
        recovered_pair_keys=np.zeros_like(pair),
        pair_signs=signs,
    )
    plain = jax.tree.map(lambda x: jnp.sum(x, axis=0, dtype=jnp.uint32), encoded)
    jax.tree.map(np.testing.assert_array_equal, unmasked, plain)
    # The masked sum itself differs from the plain sum.
    assert not np.array_equal(total['w'], plain['w'])


def test_unmask_removes_dangling_masks_of_dropped_clients():
    num_clients = 6
    pair, self_keys = _keys(num_clients, seed=3)
    members = np.array([1, 1, 1, 1, 1, 0])  # client 5 not sampled: no part in the protocol
    sent = np.array([1, 0, 1, 1, 0, 0])  # clients 1 and 4 dropped before sending
    signs = _signs(num_clients, members)
    encoded = _tree(num_clients, seed=4)
    masked = mask_updates(encoded, pair, signs, self_keys)
    total = secure.masked_sum(masked, jnp.asarray(sent))
    dropped = members * (1 - sent)
    recovered_pair = pair * (sent[:, None] * dropped[None, :])[..., None].astype(np.uint32)
    recovered_self = self_keys * sent[:, None].astype(np.uint32)
    unmasked = unmask(
        total,
        survivor=jnp.asarray(sent, jnp.float32),
        recovered_self_keys=recovered_self,
        recovered_pair_keys=recovered_pair,
        pair_signs=signs,
    )
    plain = jax.tree.map(
        lambda x: jnp.sum(
            x * sent.reshape((-1,) + (1,) * (x.ndim - 1)).astype(np.uint32),
            axis=0,
            dtype=jnp.uint32,
        ),
        encoded,
    )
    jax.tree.map(np.testing.assert_array_equal, unmasked, plain)
    # Without the dropped clients' pairwise keys the masks would not cancel.
    broken = unmask(
        total,
        survivor=jnp.asarray(sent, jnp.float32),
        recovered_self_keys=recovered_self,
        recovered_pair_keys=np.zeros_like(pair),
        pair_signs=signs,
    )
    assert not np.array_equal(broken['w'], plain['w'])


def test_one_masked_update_looks_uniform_and_uncorrelated():
    num_clients = 3
    pair, self_keys = _keys(num_clients, seed=5)
    clip = 1.0
    scale = secure.scale_for(clip, num_clients)
    # Positive inputs: without a mask the encoded words would track the input exactly.
    x = jax.random.uniform(jax.random.key(1), (num_clients, 25_000), maxval=clip)
    encoded = jax.vmap(lambda t, k: secure.encode(t, k, clip=clip, scale=scale))(
        {'x': x}, jax.random.split(jax.random.key(2), num_clients)
    )
    masked = mask_updates(encoded, pair, _signs(num_clients), self_keys)['x'][0]

    def chi2_p(words):
        counts = np.bincount(np.asarray(words).view(np.uint8), minlength=256)
        return stats.chisquare(counts).pvalue

    assert np.asarray(masked).nbytes == 100_000
    assert chi2_p(masked) > 1e-4
    assert chi2_p(encoded['x'][0]) < 1e-4  # the test has power: unmasked bytes are not uniform
    corr = np.corrcoef(np.asarray(x[0]), np.asarray(masked, np.float64))[0, 1]
    assert abs(corr) < 0.05
    assert np.corrcoef(np.asarray(x[0]), np.asarray(encoded['x'][0], np.float64))[0, 1] > 0.99


def test_decoded_sum_within_rounding_of_true_sum():
    num_clients, clip = 4, 1.0
    scale = secure.scale_for(clip, num_clients)
    x = jax.random.uniform(jax.random.key(3), (num_clients, 1000), minval=-clip, maxval=clip)
    encoded = jax.vmap(lambda t, k: secure.encode(t, k, clip=clip, scale=scale))(
        {'x': x}, jax.random.split(jax.random.key(4), num_clients)
    )
    total = secure.masked_sum(encoded, jnp.ones(num_clients))
    decoded = secure.decode(total, scale=scale)['x']
    true = np.asarray(x, np.float64).sum(0)
    assert np.max(np.abs(np.asarray(decoded, np.float64) - true)) <= num_clients / scale


def test_clipping_applies_per_coordinate():
    clip = 0.5
    scale = secure.scale_for(clip, 2)
    x = {'x': jnp.array([-3.0, 0.25, 3.0])}
    out = secure.decode(secure.encode(x, jax.random.key(0), clip=clip, scale=scale), scale=scale)
    np.testing.assert_allclose(out['x'], [-0.5, 0.25, 0.5], atol=2 / scale)


def test_stochastic_rounding_is_unbiased():
    # A coarse scale makes rounding visible: x sits 0.3 and 0.7 levels above a grid point, so
    # round-to-nearest would be off by 0.075 on average.
    scale, clip = 4.0, 1.0
    x = {'x': jnp.array([0.075, -0.425, 0.675])}
    keys = jax.random.split(jax.random.key(5), 4000)
    decoded = jax.vmap(
        lambda k: secure.decode(secure.encode(x, k, clip=clip, scale=scale), scale=scale)['x']
    )(keys)
    assert set(np.unique(np.asarray(decoded) * scale)) <= {0.0, 1.0, -2.0, -1.0, 2.0, 3.0}
    np.testing.assert_allclose(decoded.mean(0), x['x'], atol=0.01)


def test_secure_sum_jitted_with_partial_participation_and_dropout():
    num_clients, clip = 6, 1.0
    scale = secure.scale_for(clip, num_clients)
    pair, self_keys = _keys(num_clients, seed=6)
    participating = np.array([1, 1, 0, 1, 1, 1], np.float32)
    survivor = np.array([1, 1, 0, 0, 1, 1], np.float32)  # client 3 dropped
    signs = _signs(num_clients, participating.astype(np.int32))
    dropped = participating * (1 - survivor)
    inputs = secure.SecAggInputs(
        pair_keys=pair,
        pair_signs=signs,
        self_keys=self_keys,
        survivor=survivor,
        recovered_self_keys=self_keys * survivor[:, None].astype(np.uint32),
        recovered_pair_keys=pair
        * (survivor[:, None] * dropped[None, :])[..., None].astype(np.uint32),
    )
    updates = {
        'w': jax.random.uniform(jax.random.key(7), (num_clients, 2, 3), minval=-1.0),
        'b': jax.random.uniform(jax.random.key(8), (num_clients, 4), minval=-1.0),
    }
    fn = jax.jit(lambda u, p, s, k, i: secure.secure_sum(u, p, s, k, i, clip=clip, scale=scale))
    out = fn(updates, participating, survivor, jax.random.key(9), jax.tree.map(jnp.asarray, inputs))
    for name, leaf in updates.items():
        true = np.tensordot(survivor, np.asarray(leaf, np.float64), axes=1)
        assert np.max(np.abs(np.asarray(out[name]) - true)) <= num_clients / scale


@pytest.mark.parametrize('members', [None, np.array([1, 0, 1, 1, 1, 0, 1])])
def test_one_device_and_sharded_layouts_mask_and_sum_the_same_bits(members):
    """Each pairwise stream expanded once for both clients (one device) gives the masks that each
    client expands for itself (sharded), and the row-by-row sum is the reduction's."""
    num_clients = 7
    pair, self_keys = _keys(num_clients, seed=6)
    signs = _signs(num_clients, members)
    encoded = _tree(num_clients, seed=7)
    masked = {
        single: jax.jit(lambda *a, s=single: secure.mask_updates(*a, single_device=s))(
            encoded, pair, signs, self_keys
        )
        for single in (True, False)
    }
    jax.tree.map(np.testing.assert_array_equal, masked[True], masked[False])
    sent = np.array([1, 1, 0, 1, 0, 1, 1])
    sums = [secure.masked_sum(masked[True], sent, single_device=s) for s in (True, False)]
    jax.tree.map(np.testing.assert_array_equal, *sums)
    # Row u of the pairwise part is exactly sum_v signs[u, v] * PRG(pair[u, v]).
    like = _like(encoded)
    zeros = jax.tree.map(jnp.zeros_like, encoded)
    pairwise = jax.jit(secure.add_pairwise_masks)(zeros, pair, signs)
    for u in (0, 1, 6):
        expect = jax.tree.map(jnp.zeros_like, like)
        for v in range(num_clients):
            m = secure.expand_mask(pair[u, v], like)
            expect = jax.tree.map(
                lambda e, x, s=signs[u, v]: e + np.uint32(int(s) % 2**32) * x, expect, m
            )
        jax.tree.map(lambda p, e, u=u: np.testing.assert_array_equal(p[u], e), pairwise, expect)


@pytest.mark.parametrize(
    'key, counter, expected',
    [
        # Random123's known-answer vectors for Threefry-2x32 with 20 rounds (kat_vectors).
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_matches_the_published_known_answers(key, counter, expected):
    out = secure.threefry2x32(
        jnp.asarray(key, jnp.uint32), jnp.uint32(counter[0]), jnp.uint32(counter[1])
    )
    assert tuple(int(x) for x in out) == expected


def test_prg_streams_are_counter_mode_blocks_and_look_uniform():
    seed = jnp.asarray([7, 11], jnp.uint32)
    words = np.asarray(secure.prg_bits(seed, 9, stream=3))
    for i in range(4):  # block i = (stream, i) gives words 2i, 2i + 1; an odd count is cut
        x0, x1 = secure.threefry2x32(seed, jnp.uint32(3), jnp.uint32(i))
        assert (words[2 * i], words[2 * i + 1]) == (int(x0), int(x1))
    x0, _ = secure.threefry2x32(seed, jnp.uint32(3), jnp.uint32(4))
    assert words[8] == int(x0)
    big = np.asarray(secure.prg_bits(seed, 100_000, stream=0))
    counts = np.bincount(big.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    # Another stream or another seed gives other words.
    assert np.mean(big[:1000] == np.asarray(secure.prg_bits(seed, 1000, stream=1))) < 0.01
    other = np.asarray(secure.prg_bits(jnp.asarray([7, 12], jnp.uint32), 1000))
    assert np.mean(big[:1000] == other) < 0.01
