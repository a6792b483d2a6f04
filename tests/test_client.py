"""The local update and the jitted round on a tiny linear model, against hand-rolled numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fedjax_med import client as client_lib
from fedjax_med import parallel, rounds
from fedjax_med.state import ClientInputs, RoundInputs
from fedjax_med.tasks import TASKS

D, L = 6, 14  # features, labels (chest X-ray task: 14 sigmoid outputs)


def linear_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params['w'] + params['b']


def make_data(seed, n=12):
    rng = np.random.default_rng(seed)
    return {
        'image': rng.normal(size=(n, D, 1, 1)).astype(np.float32),
        'label': (rng.random((n, L)) < 0.3).astype(np.float32),
    }


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        'w': jnp.asarray(rng.normal(size=(D, L)) * 0.1, jnp.float32),
        'b': jnp.zeros(L, jnp.float32),
    }


def numpy_sgd(params, data, indices, mask, lr, steps, mu=0.0):
    """Reference: mean sigmoid cross-entropy over kept examples, plain SGD, FedProx term."""
    w, b = np.array(params['w'], np.float64), np.array(params['b'], np.float64)
    w0, b0 = w.copy(), b.copy()
    for s in range(steps):
        x = data['image'][indices[s]].reshape(len(indices[s]), -1)
        y = data['label'][indices[s]]
        m = mask[s][:, None]
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g_logits = (p - y) / L * m / max(mask[s].sum(), 1)
        gw, gb = x.T @ g_logits + mu * (w - w0), g_logits.sum(0) + mu * (b - b0)
        w, b = w - lr * gw, b - lr * gb
    return {'w': w - w0, 'b': b - b0}


def run_local(params, data, indices, mask, active, lr=0.5, mu=0.0):
    task = TASKS['chestxray14']
    inputs = ClientInputs(
        indices=jnp.asarray(indices),
        mask=jnp.asarray(mask),
        step_active=jnp.asarray(active),
        expected_batch=jnp.float32(4.0),
        noise_multiplier=jnp.float32(0.0),
        key=jax.random.key(0),
    )
    return client_lib.local_update(
        params,
        jax.tree.map(jnp.asarray, data),
        inputs,
        jnp.float32(lr),
        grad_fn=client_lib.mean_gradient(linear_apply, task.per_example_loss),
        optimizer=client_lib.client_optimizer('sgd'),
        prox_mu=mu,
    )


@pytest.mark.parametrize('mu', [0.0, 0.7])
def test_local_update_matches_numpy_sgd_and_fedprox(mu):
    data, params = make_data(1), init_params()
    indices = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], np.int32)
    mask = np.ones((3, 4), np.float32)
    mask[2, 2:] = 0  # a partial last batch
    out = run_local(params, data, indices, mask, np.ones(3, bool), mu=mu)
    ref = numpy_sgd(params, data, indices, mask, 0.5, 3, mu)
    for k in ('w', 'b'):
        np.testing.assert_allclose(out.delta[k], ref[k], atol=1e-6)
    assert int(out.num_steps) == 3
    assert float(out.metrics['example_count']) == 10


def test_fedprox_term_changes_the_update():
    data, params = make_data(1), init_params()
    indices = np.arange(12, dtype=np.int32).reshape(3, 4)
    mask, active = np.ones((3, 4), np.float32), np.ones(3, bool)
    plain = run_local(params, data, indices, mask, active, mu=0.0).delta['w']
    prox = run_local(params, data, indices, mask, active, mu=1.0).delta['w']
    # The proximal pull keeps the local model closer to the global one.
    assert float(jnp.linalg.norm(prox)) < float(jnp.linalg.norm(plain))


def test_padded_examples_and_inactive_steps_change_nothing():
    data, params = make_data(2), init_params()
    indices = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
    active = np.array([True, True])
    base_out = run_local(params, data, indices, mask, active)
    poisoned = {k: v.copy() for k, v in data.items()}
    for s, b in zip(*np.nonzero(mask == 0), strict=True):
        poisoned['image'][indices[s, b]] = 1e3
        poisoned['label'][indices[s, b]] = 1 - poisoned['label'][indices[s, b]]
    poisoned_out = run_local(params, poisoned, indices, mask, active)
    np.testing.assert_array_equal(base_out.delta['w'], poisoned_out.delta['w'])
    # A step marked inactive leaves parameters and optimiser state untouched.
    one_step = run_local(params, data, indices, mask, np.array([True, False]))
    ref = numpy_sgd(params, data, indices[:1], mask[:1], 0.5, 1)
    np.testing.assert_allclose(one_step.delta['w'], ref['w'], atol=1e-6)
    assert int(one_step.num_steps) == 1


def round_setup(num_clients=3, steps=2, batch=4, overrides=None):
    config = base.get_base_config()
    config.local.optimizer = 'sgd'
    config.local.learning_rate = 0.5
    config.update_from_flattened_dict(overrides or {})
    mesh = parallel.make_mesh(1)
    fn = rounds.build_round_fn(
        apply_fn=linear_apply, task=TASKS['chestxray14'], config=config, mesh=mesh
    )
    datas = [make_data(10 + k, steps * batch) for k in range(num_clients)]
    client_data = {k: jnp.stack([jnp.asarray(d[k]) for d in datas]) for k in ('image', 'label')}
    indices = np.tile(
        np.arange(steps * batch, dtype=np.int32).reshape(steps, batch), (num_clients, 1, 1)
    )

    def inputs(weights, noise_multiplier=(0.0,) * num_clients):
        return RoundInputs(
            indices=jnp.asarray(indices),
            mask=jnp.ones(indices.shape, jnp.float32),
            step_active=jnp.asarray(np.asarray(weights)[:, None] > 0).repeat(steps, 1),
            weights=jnp.asarray(weights, jnp.float32),
            expected_batch=jnp.full(num_clients, batch, jnp.float32),
            noise_multiplier=jnp.asarray(noise_multiplier, jnp.float32),
            client_ids=jnp.arange(num_clients, dtype=jnp.int32),
            learning_rate=jnp.float32(0.5),
        )

    state = rounds.init_server_state(init_params(), config, num_clients, mesh)
    return fn, state, client_data, inputs, datas, indices


def test_round_is_weighted_fedavg_and_ignores_non_participants():
    fn, state, client_data, inputs, datas, indices = round_setup()
    params0 = jax.tree.map(np.asarray, state.params)
    new_state, metrics = fn(state, client_data, inputs([8.0, 4.0, 0.0]), jax.random.key(1))
    refs = [numpy_sgd(params0, d, indices[0], np.ones(indices[0].shape), 0.5, 2) for d in datas[:2]]
    expected = params0['w'] + (8 * refs[0]['w'] + 4 * refs[1]['w']) / 12
    np.testing.assert_allclose(new_state.params['w'], expected, atol=1e-6)
    assert int(new_state.round) == 1
    # The third hospital's data cannot matter: it did not take part.
    _, state2, client_data2, _, _, _ = round_setup()
    client_data2['image'] = client_data2['image'].at[2].set(1e3)
    new_state2, _ = fn(state2, client_data2, inputs([8.0, 4.0, 0.0]), jax.random.key(1))
    np.testing.assert_array_equal(new_state.params['w'], new_state2.params['w'])
    np.testing.assert_array_equal(metrics['clients/num_steps'], [2, 2, 0])


def test_round_compiles_once_across_participation_patterns():
    fn, state, client_data, inputs, _, _ = round_setup()
    for r, weights in enumerate([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]):
        state, _ = fn(state, client_data, inputs(weights), jax.random.key(r))
    assert fn.num_traces == 1


def test_a_round_makes_no_host_round_trips():
    # Once its inputs are on the device, a round runs without any implicit host<->device
    # transfer: data gathering, local steps, aggregation and the server step all stay on device.
    fn, state, client_data, inputs, _, _ = round_setup()
    round_inputs, key = inputs([8.0, 4.0, 1.0]), jax.random.key(1)
    state, _ = fn(state, client_data, round_inputs, key)  # compile outside the guard
    with jax.transfer_guard('disallow'):
        state, metrics = fn(state, client_data, round_inputs, key)
        jax.block_until_ready((state, metrics))
    assert int(jax.device_get(state.round)) == 2


def test_dp_sgd_noise_of_each_hospital_follows_its_own_noise_multiplier():
    """Local mode keeps each hospital's model: the hospital given sigma = 0 trains exactly as in
    a noise-free round, and the noisier of two noised hospitals moves further from it."""

    def local_models(sigmas):
        fn, state, client_data, inputs, _, _ = round_setup(
            overrides={'mode': 'local', 'dp.mode': 'sample', 'dp.clip_norm': 1.0}
        )
        new_state, _ = fn(state, client_data, inputs([1.0, 1.0, 1.0], sigmas), jax.random.key(3))
        return np.asarray(new_state.params['w'])

    quiet, noisy = local_models([0.0, 0.0, 0.0]), local_models([0.0, 1.0, 8.0])
    np.testing.assert_array_equal(noisy[0], quiet[0])
    gap = np.linalg.norm((noisy - quiet).reshape(3, -1), axis=1)
    assert 0 < gap[1] < gap[2]
    # sigma * C / B * lr * sqrt(steps * coordinates): the noise scale that was added.
    np.testing.assert_allclose(gap[2] / gap[1], 8.0, rtol=0.2)
