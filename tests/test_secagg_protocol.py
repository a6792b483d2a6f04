"""Host side of secure aggregation: key agreement, Shamir, SecAgg+ graph, dropouts, byte counts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med.aggregation import secagg_protocol as sp
from fedjax_med.aggregation import secure


def test_agreement_is_symmetric_and_round_specific():
    (sk_u, pk_u), (sk_v, pk_v) = sp.x25519_keypairs(2, rng_seed=0)
    assert len(pk_u) == sp.PUBLIC_KEY_BYTES
    assert sp.agree(sk_u, pk_v, round_index=3) == sp.agree(sk_v, pk_u, round_index=3)
    assert sp.agree(sk_u, pk_v, round_index=3) != sp.agree(sk_u, pk_v, round_index=4)
    assert sp.agree(sk_u, pk_v, purpose='mask') != sp.agree(sk_u, pk_v, purpose='share')
    words = sp.seed_to_key_words(bytes(range(32)))
    assert words.dtype == np.uint32
    np.testing.assert_array_equal(words, [0x03020100, 0x07060504])
    # Reproducible from the seed, different for another seed.
    assert sp.x25519_keypairs(1, rng_seed=0)[0][1] == pk_u
    assert sp.x25519_keypairs(1, rng_seed=1)[0][1] != pk_u


@pytest.mark.parametrize('secret', [0, 12345678901234567890, sp.PRIME - 1])
def test_shamir_any_t_shares_rebuild_and_fewer_do_not(secret):
    n, t = 5, 3
    shares = sp.shamir_split(secret, n, t, np.random.default_rng(0))
    for subset in itertools.combinations(shares, t):
        assert sp.shamir_reconstruct(subset) == secret
    for subset in itertools.combinations(shares, n):
        assert sp.shamir_reconstruct(subset) == secret
    for subset in itertools.combinations(shares, t - 1):
        assert sp.shamir_reconstruct(subset) != secret


def test_shamir_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match='threshold'):
        sp.shamir_split(1, 3, 4, rng)
    with pytest.raises(ValueError, match='secret'):
        sp.shamir_split(sp.PRIME, 3, 2, rng)
    with pytest.raises(ValueError, match='distinct'):
        sp.shamir_reconstruct([(1, 5), (1, 6)])
    shares = sp.shamir_split(99, 3, 2, rng, xs=[4, 9, 11])
    assert [x for x, _ in shares] == [4, 9, 11]
    assert sp.shamir_reconstruct(shares[1:]) == 99


@pytest.mark.parametrize('num_clients,k', [(10, 4), (10, 3), (7, 2), (8, 7), (9, 8), (6, 1)])
def test_neighbour_graph_is_symmetric_and_regular(num_clients, k):
    graph = sp.neighbour_graph(num_clients, k, np.random.default_rng(k))
    assert graph.dtype == bool and graph.shape == (num_clients, num_clients)
    np.testing.assert_array_equal(graph, graph.T)
    assert not graph.diagonal().any()
    np.testing.assert_array_equal(graph.sum(1), k)


def test_neighbour_graph_complete_and_errors():
    np.testing.assert_array_equal(
        sp.neighbour_graph(4, None, np.random.default_rng(0)), ~np.eye(4, dtype=bool)
    )
    with pytest.raises(ValueError, match='odd'):
        sp.neighbour_graph(7, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match='neighbours_k'):
        sp.neighbour_graph(5, 5, np.random.default_rng(0))
    # Relabelled at random: two seeds give different graphs.
    assert not np.array_equal(
        sp.neighbour_graph(12, 4, np.random.default_rng(0)),
        sp.neighbour_graph(12, 4, np.random.default_rng(1)),
    )


def _bools(*values):
    return np.array(values, dtype=bool)


@jax.jit
def _unmask_device(inputs: secure.SecAggInputs, encoded: dict) -> dict:
    masked = secure.mask_updates(encoded, inputs.pair_keys, inputs.pair_signs, inputs.self_keys)
    total = secure.masked_sum(masked, inputs.survivor)
    return secure.unmask(
        total,
        survivor=inputs.survivor,
        recovered_self_keys=inputs.recovered_self_keys,
        recovered_pair_keys=inputs.recovered_pair_keys,
        pair_signs=inputs.pair_signs,
    )


def _unmasked_sum(setup: sp.RoundSetup, encoded: dict) -> dict:
    return _unmask_device(jax.tree.map(jnp.asarray, setup.device_inputs()), encoded)


def _plain_sum(encoded: dict, sent: np.ndarray) -> dict:
    return jax.tree.map(
        lambda x: jnp.sum(
            x * jnp.asarray(sent, jnp.uint32).reshape((-1,) + (1,) * (x.ndim - 1)),
            axis=0,
            dtype=jnp.uint32,
        ),
        encoded,
    )


def _encoded(num_clients: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draw = lambda shape: jnp.asarray(
        rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
    )
    return {'w': draw((num_clients, 3, 2)), 'b': draw((num_clients, 5))}


@pytest.mark.parametrize('num_dropped', [0, 1, 2])
def test_unmasked_sum_is_exact_with_up_to_n_minus_t_dropouts(num_dropped):
    # 6 participants: every secret is shared among n = 5 neighbours with t = 3.
    num_clients = 7
    participating = _bools(1, 1, 1, 0, 1, 1, 1)
    dropout = np.zeros(num_clients, bool)
    dropout[[0, 5][:num_dropped]] = True
    setup = sp.run_protocol(
        round_index=2,
        seed=11,
        participating=participating,
        dropout=dropout,
        threshold=None,
        neighbours_k=None,
    )
    assert setup.threshold == 3
    sent = participating & ~dropout
    np.testing.assert_array_equal(setup.survivor, sent)
    encoded = _encoded(num_clients, seed=num_dropped)
    jax.tree.map(
        np.testing.assert_array_equal, _unmasked_sum(setup, encoded), _plain_sum(encoded, sent)
    )
    # The server rebuilt exactly one kind of secret per client: b_u of senders, keys of droppers.
    np.testing.assert_array_equal(setup.reconstructed_self, sent)
    np.testing.assert_array_equal(setup.reconstructed_mask_key, dropout)
    assert not np.any(setup.reconstructed_self & setup.reconstructed_mask_key)
    np.testing.assert_array_equal(setup.recovered_self_keys[sent], setup.self_keys[sent])
    for u, v in itertools.product(np.flatnonzero(sent), np.flatnonzero(dropout)):
        np.testing.assert_array_equal(setup.recovered_pair_keys[u, v], setup.pair_keys[u, v])


def test_secagg_plus_sparse_graph_with_dropout_and_late_dropout():
    num_clients = 10
    participating = np.ones(num_clients, bool)
    dropout = np.zeros(num_clients, bool)
    dropout[4] = True
    late = np.zeros(num_clients, bool)
    late[7] = True
    setup = sp.run_protocol(
        round_index=0,
        seed=5,
        participating=participating,
        dropout=dropout,
        threshold=2,
        neighbours_k=4,
        late_dropout=late,
    )
    np.testing.assert_array_equal(setup.neighbours.sum(1), 4)
    np.testing.assert_array_equal(setup.pair_signs != 0, setup.neighbours)
    np.testing.assert_array_equal(setup.pair_keys, setup.pair_keys.transpose(1, 0, 2))
    sent = ~dropout  # the late dropout's input is in the sum
    encoded = _encoded(num_clients, seed=9)
    jax.tree.map(
        np.testing.assert_array_equal, _unmasked_sum(setup, encoded), _plain_sum(encoded, sent)
    )
    assert setup.reconstructed_self[7] and not setup.reconstructed_mask_key[7]


def test_more_than_n_minus_t_dropouts_fail_the_round():
    participating = np.ones(6, bool)  # n = 5 neighbours, t = 3: 3 dropouts leave 2 holders
    with pytest.raises(sp.RoundFailedError, match='threshold'):
        sp.run_protocol(
            round_index=0,
            seed=0,
            participating=participating,
            dropout=_bools(1, 1, 1, 0, 0, 0),
            threshold=None,
            neighbours_k=None,
        )
    with pytest.raises(sp.RoundFailedError, match='threshold'):
        sp.run_protocol(
            round_index=0,
            seed=0,
            participating=participating,
            dropout=_bools(1, 1, 1, 1, 0, 0),
            threshold=None,
            neighbours_k=None,
        )
    with pytest.raises(sp.RoundFailedError, match='at least 2'):
        sp.run_protocol(
            round_index=0,
            seed=0,
            participating=_bools(0, 1, 0),
            dropout=_bools(0, 0, 0),
            threshold=None,
            neighbours_k=None,
        )


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='threshold'):
        sp.run_protocol(
            round_index=0,
            seed=0,
            participating=np.ones(4, bool),
            dropout=np.zeros(4, bool),
            threshold=4,
            neighbours_k=None,
        )
    with pytest.raises(ValueError, match='subset'):
        sp.run_protocol(
            round_index=0,
            seed=0,
            participating=_bools(1, 1, 0),
            dropout=_bools(0, 0, 1),
            threshold=None,
            neighbours_k=None,
        )


def test_a_client_never_reveals_both_share_kinds():
    setup_rng = np.random.default_rng(0)
    (c_u, c_pk_u), (c_v, c_pk_v), (m_u, _), (m_v, _) = sp.x25519_keypairs(4, setup_rng)
    holder = sp._Client(index=1, cipher_sk=c_v, mask_sk=m_v, self_seed=7)
    plain = sp._share_plaintext(0, 1, 123, [4, 5, 6])
    holder.held[0] = sp._encrypt(c_u, c_pk_v, plain, b'\0' * 12, round_index=0)
    assert holder.reveal(0, 'self', c_pk_u, round_index=0) == [(2, 123)]
    assert holder.reveal(0, 'self', c_pk_u, round_index=0) == [(2, 123)]
    with pytest.raises(AssertionError, match='both share kinds'):
        holder.reveal(0, 'mask', c_pk_u, round_index=0)


def test_byte_counts_complete_graph():
    # 5 participants (degree 4, t = 3), client 1 drops, client 5 not sampled.
    setup = sp.run_protocol(
        round_index=3,
        seed=0,
        participating=_bools(1, 1, 1, 1, 1, 0),
        dropout=_bools(0, 1, 0, 0, 0, 0),
        threshold=None,
        neighbours_k=None,
    )
    ciphertext = 12 + (4 + 4 + 16 + 3 * 16) + 16  # nonce + (u, v, b-share, 3 key shares) + tag
    advertise_up, advertise_down = 2 * 32, 4 * (4 + 2 * 32)
    share_keys = 4 * (4 + ciphertext)
    unmask_up = 3 * (4 + 16) + 1 * (4 + 3 * 16)  # 3 surviving, 1 dropped neighbour
    np.testing.assert_array_equal(
        setup.bytes_up,
        [
            advertise_up + share_keys + unmask_up,
            advertise_up + share_keys,
            *[advertise_up + share_keys + unmask_up] * 3,
            0,
        ],
    )
    np.testing.assert_array_equal(
        setup.bytes_down,
        [
            advertise_down + share_keys + 4 * 4,
            advertise_down + share_keys,
            *[advertise_down + share_keys + 4 * 4] * 3,
            0,
        ],
    )


def test_reproducible_and_round_specific():
    kwargs = dict(
        seed=3,
        participating=np.ones(4, bool),
        dropout=np.zeros(4, bool),
        threshold=None,
        neighbours_k=None,
    )
    a = sp.run_protocol(round_index=1, **kwargs)
    b = sp.run_protocol(round_index=1, **kwargs)
    c = sp.run_protocol(round_index=2, **kwargs)
    np.testing.assert_array_equal(a.pair_keys, b.pair_keys)
    np.testing.assert_array_equal(a.self_keys, b.self_keys)
    assert not np.array_equal(a.pair_keys, c.pair_keys)


def test_non_participants_take_no_part():
    setup = sp.run_protocol(
        round_index=0,
        seed=1,
        participating=_bools(1, 0, 1, 1),
        dropout=_bools(0, 0, 0, 0),
        threshold=2,
        neighbours_k=None,
    )
    assert not setup.pair_signs[1].any() and not setup.pair_signs[:, 1].any()
    assert not setup.self_keys[1].any() and setup.bytes_up[1] == 0 == setup.bytes_down[1]
    empty = sp.run_protocol(
        round_index=0,
        seed=1,
        participating=np.zeros(3, bool),
        dropout=np.zeros(3, bool),
        threshold=None,
        neighbours_k=None,
    )
    assert not empty.pair_signs.any() and not empty.survivor.any()


def test_secure_sum_jitted_on_protocol_inputs():
    num_clients, clip = 8, 1.0
    scale = secure.scale_for(clip, num_clients)
    participating = _bools(1, 1, 1, 1, 1, 1, 0, 1)
    setup = sp.run_protocol(
        round_index=4,
        seed=2,
        participating=participating,
        dropout=_bools(0, 0, 1, 0, 0, 0, 0, 0),
        threshold=None,
        neighbours_k=4,
    )
    updates = {'w': jax.random.uniform(jax.random.key(0), (num_clients, 3, 3), minval=-1.0)}
    inputs = jax.tree.map(jnp.asarray, setup.device_inputs())
    fn = jax.jit(
        lambda u, p, k, i: secure.secure_sum(u, p, i.survivor, k, i, clip=clip, scale=scale)
    )
    out = fn(updates, jnp.asarray(participating, jnp.float32), jax.random.key(1), inputs)
    true = np.tensordot(setup.survivor, np.asarray(updates['w'], np.float64), axes=1)
    assert np.max(np.abs(np.asarray(out['w']) - true)) <= num_clients / scale
