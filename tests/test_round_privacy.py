"""Client-level DP and SecAgg inside the jitted round, on the tiny linear model of
tests/test_client.py: the noise the server's sum carries is the noise the accountant assumes,
FedAvg weights survive the SecAgg encoding, and no two noise draws share a key."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from fedjax_med import parallel, rounds
from fedjax_med.aggregation import client_dp_mean, secagg_host
from fedjax_med.state import RoundInputs
from fedjax_med.tasks import TASKS
from tests.test_client import init_params, linear_apply, make_data

K, STEPS, BATCH = 5, 2, 4


def round_parts(config, expected_clients=1.0, noise_multiplier=0.0):
    """(round fn, initial state, client data, inputs for (weights, round index))."""
    mesh = parallel.make_mesh(1)
    fn = rounds.build_round_fn(
        apply_fn=linear_apply,
        task=TASKS['chestxray14'],
        config=config,
        mesh=mesh,
        client_noise_multiplier=noise_multiplier,
        expected_clients=expected_clients,
    )
    datas = [make_data(20 + k, STEPS * BATCH) for k in range(K)]
    client_data = parallel.put_clients(
        {key: np.stack([d[key] for d in datas]) for key in ('image', 'label')}, mesh
    )
    indices = np.tile(np.arange(STEPS * BATCH, dtype=np.int32).reshape(STEPS, BATCH), (K, 1, 1))

    def inputs_for(weights, r):
        w = np.asarray(weights, np.float32)
        secagg = ()
        if config.secagg.enabled:
            secagg, _, _ = secagg_host.secagg_round(config, r, w > 0, K)
        return RoundInputs(
            indices=indices,
            mask=np.ones(indices.shape, np.float32),
            step_active=np.repeat(w[:, None] > 0, STEPS, axis=1),
            weights=w,
            expected_batch=np.full(K, BATCH, np.float32),
            noise_multiplier=np.zeros(K, np.float32),
            client_ids=np.arange(K, dtype=np.int32),
            learning_rate=np.float32(0.5),
            secagg=secagg,
        )

    state = rounds.init_server_state(init_params(), config, K, mesh)
    return fn, state, client_data, inputs_for


def sgd_config():
    c = base.get_base_config()
    c.data.num_clients = K
    c.local.optimizer = 'sgd'
    c.server.optimizer = 'fedavg'
    c.server.learning_rate = 1.0  # new params - old params = the aggregate
    return c


def aggregates(config, rounds_to_run, weights, **kw):
    """The aggregate (new params - old params) of `rounds_to_run` rounds from the same start,
    each with its own round key, flattened to one vector per round."""
    fn, state, client_data, inputs_for = round_parts(config, **kw)
    start = jax.tree.map(np.asarray, state.params)
    out = []
    for r in range(rounds_to_run):
        s = rounds.init_server_state(
            jax.tree.map(jnp.asarray, start), config, K, parallel.make_mesh(1)
        )
        new, _ = fn(s, client_data, inputs_for(weights, r), rounds.round_key(0, r))
        out.append(
            np.concatenate([np.ravel(np.asarray(new.params[k]) - start[k]) for k in sorted(start)])
        )
    return np.stack(out)


def test_client_dp_noise_under_secagg_is_the_accounted_noise():
    # Five hospitals, z = 8, S = 0.01: each hospital's share of the noise has std z S / sqrt(5),
    # 3.6 S, far outside a per-coordinate clip of S. The sum must still carry N(0, (z S)^2) in
    # every coordinate (the mean: z S / m); clipping the noised shares left about a quarter.
    z, clip_norm = 8.0, 0.01
    stds = {}
    for enabled in (False, True):
        c = sgd_config()
        c.dp.mode, c.dp.clip_norm = 'client', clip_norm
        c.secagg.enabled, c.secagg.clip = enabled, clip_norm
        agg = aggregates(c, 6, np.ones(K), expected_clients=float(K), noise_multiplier=z)
        # The clipped mean moves each coordinate by at most S / sqrt(98): tiny next to the noise.
        stds[enabled] = float(np.std(agg))
    expected = z * clip_norm / K
    for enabled, std in stds.items():
        assert abs(std / expected - 1) < 0.1, (enabled, std, expected)


def test_secagg_fedavg_weights_are_not_cut_by_the_coordinate_clip():
    # Hospital 0 holds 8/14 of the weight, far above secagg.clip = 0.05; the weighted mean
    # must not be rescaled by a clipped weight sum.
    weights = [8.0, 4.0, 0.0, 1.0, 1.0]
    plain = sgd_config()
    masked = sgd_config()
    masked.secagg.enabled, masked.secagg.clip = True, 0.05
    want = aggregates(plain, 1, weights)[0]
    share = np.asarray(weights) / np.sum(weights)
    # The weighted deltas themselves stay inside the clip, so only the weight could be cut.
    for k in np.flatnonzero(share):
        alone = aggregates(plain, 1, np.eye(K)[k])[0]  # hospital k's own delta
        assert share[k] * np.max(np.abs(alone)) < 0.05
    got = aggregates(masked, 1, weights)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_client_dp_noise_keys_are_all_distinct():
    update_key, count_key = client_dp_mean.client_dp_keys(rounds.round_key(3, 7))
    drawn = set()
    # The update noise splits its key over leaves (central noise) or folds in hospital ids and
    # then splits over leaves (noise shares under SecAgg).
    for n in range(1, 9):
        drawn.update(
            tuple(np.asarray(jax.random.key_data(k)).ravel())
            for k in jax.random.split(update_key, n)
        )
    for i in range(64):
        hospital = jax.random.fold_in(update_key, i)
        drawn.add(tuple(np.asarray(jax.random.key_data(hospital)).ravel()))
        drawn.update(
            tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in jax.random.split(hospital, 4)
        )
    assert tuple(np.asarray(jax.random.key_data(count_key)).ravel()) not in drawn
    assert tuple(np.asarray(jax.random.key_data(update_key)).ravel()) not in drawn


def test_non_finite_updates_are_counted_before_secagg_could_hide_them():
    # SecAgg's fixed-point encoding maps NaN to 0, so the sum alone would look finite; the round
    # counts the hospitals whose own update is not finite (only those taking part).
    c = sgd_config()
    c.secagg.enabled = True
    fn, state, client_data, inputs_for = round_parts(c)
    image = np.array(client_data['image'])
    image[2, 0] = np.nan
    client_data = dict(client_data, image=jnp.asarray(image))
    start = jax.tree.map(np.asarray, state.params)
    for weights, bad in (([1.0, 1.0, 1.0, 1.0, 1.0], 1), ([1.0, 1.0, 0.0, 1.0, 1.0], 0)):
        s = rounds.init_server_state(jax.tree.map(jnp.asarray, start), c, K, parallel.make_mesh(1))
        _, m = fn(s, client_data, inputs_for(weights, 0), rounds.round_key(0, 0))
        assert int(m['train/nonfinite_updates']) == bad
