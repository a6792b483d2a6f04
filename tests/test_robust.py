"""Robust aggregators (coordinate-wise median, trimmed mean) on hand-made pytrees with exact
values, inside the jitted round, on 1 vs 8 devices, in a smoke run, and their config checks."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, chestxray14
from fedjax_med import parallel, rounds, train
from fedjax_med.aggregation import fedavg, robust
from fedjax_med.state import RoundInputs
from fedjax_med.tasks import TASKS
from fedjax_med.validate import validate
from tests.test_client import init_params, linear_apply, make_data, numpy_sgd
from tests.test_end_to_end import run_python

# Four hospitals, two coordinates of 'w' and a scalar 'b'; the last one sits the round out.
STACKED = {
    'w': jnp.array([[1.0, 5.0], [3.0, -2.0], [2.0, 0.0], [100.0, 100.0]]),
    'b': jnp.array([4.0, 1.0, 7.0, -50.0]),
}


def test_median_odd_number_of_participants():
    out = robust.coordinate_median(STACKED, jnp.array([1.0, 1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(out['w'], [2.0, 0.0])
    np.testing.assert_array_equal(out['b'], 4.0)


def test_median_even_number_is_the_mean_of_the_two_middle_values():
    out = robust.coordinate_median(STACKED, jnp.array([1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(out['w'], [2.5, 2.5])  # (2 + 3) / 2, (0 + 5) / 2
    np.testing.assert_array_equal(out['b'], 2.5)  # (1 + 4) / 2
    # Weights only say who takes part: their sizes (example counts) do not matter.
    out = robust.coordinate_median(STACKED, jnp.array([5.0, 0.1, 1.0, 300.0]))
    np.testing.assert_array_equal(out['w'], [2.5, 2.5])


def test_trimmed_mean_hand_values():
    stacked = {
        'w': jnp.array([[4.0, 0.0], [-1.0, 0.0], [10.0, 9.0], [2.0, 1.0], [3.0, 2.0], [1e6, -1e6]])
    }
    five = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    # beta = 0.2, m = 5: floor(1.0) = 1 value dropped from each end.
    out = robust.trimmed_mean(stacked, five, 0.2)
    np.testing.assert_allclose(out['w'], [(2 + 3 + 4) / 3, (0 + 1 + 2) / 3], rtol=1e-6)
    # beta = 0.19: floor(0.95) = 0, the plain mean of the participants.
    out = robust.trimmed_mean(stacked, five, 0.19)
    np.testing.assert_allclose(out['w'], [18 / 5, 12 / 5], rtol=1e-6)
    # beta = 0.4, m = 5: floor(2.0) = 2 from each end leaves the median.
    out = robust.trimmed_mean(stacked, five, 0.4)
    np.testing.assert_allclose(out['w'], [3.0, 1.0])
    # beta = 0.25, m = 4 (hospital 0 out too): 1 from each end of [-1, 2, 3, 10] and [0, 1, 2, 9].
    out = robust.trimmed_mean(stacked, jnp.array([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]), 0.25)
    np.testing.assert_allclose(out['w'], [2.5, 1.5])


@pytest.mark.parametrize(
    'combine', [robust.coordinate_median, lambda s, w: robust.trimmed_mean(s, w, 0.25)]
)
def test_non_participants_are_ignored_exactly(combine):
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    base_out = combine(STACKED, weights)
    for junk in (1e30, -1e30, np.nan, np.inf):
        poisoned = jax.tree.map(lambda x, j=junk: x.at[3].set(j), STACKED)
        out = combine(poisoned, weights)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(base_out), strict=True):
            np.testing.assert_array_equal(a, b)
    # Nobody taking part gives a zero update, like FedAvg.
    nobody = combine(STACKED, jnp.zeros(4))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(nobody))


# Seven hospitals: hospital 2 takes part with a faulty update (set per test), hospital 4 sits out.
FAULTY = {
    'w': jnp.array(
        [[1.0, 5.0], [3.0, -2.0], [0.0, 0.0], [2.0, 0.0], [100.0, 100.0], [-1.0, 9.0], [4.0, -3.0]]
    ),
    'b': jnp.array([4.0, 1.0, 0.0, 0.0, -50.0, 2.0, 10.0]),
}
FAULTS = [('w', (2, 0), np.nan), ('w', (2, 1), np.inf), ('b', (2,), -np.inf), ('b', (2,), np.nan)]


def _faulty(leaf, index, value):
    return {k: v.at[index].set(value) if k == leaf else v for k, v in FAULTY.items()}


@pytest.mark.parametrize('leaf,index,value', FAULTS)
def test_median_excludes_a_participant_with_a_non_finite_value(leaf, index, value):
    stacked = _faulty(leaf, index, value)
    # m = 4 finite participants (0, 1, 3, 5; 2 faulty, 4 and 6 out): the mean of the middle two.
    out = robust.coordinate_median(stacked, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(out['w'], [1.5, 2.5])  # [-1, 1, 2, 3], [-2, 0, 5, 9]
    np.testing.assert_array_equal(out['b'], 1.5)  # [0, 1, 2, 4]
    # m = 3 (0, 1, 3): the middle value.
    out = robust.coordinate_median(stacked, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(out['w'], [2.0, 0.0])  # [1, 2, 3], [-2, 0, 5]
    np.testing.assert_array_equal(out['b'], 1.0)  # [0, 1, 4]
    assert float(robust.excluded_count(stacked, jnp.ones(7))) == 1.0


@pytest.mark.parametrize('leaf,index,value', FAULTS)
def test_trimmed_mean_excludes_a_participant_with_a_non_finite_value(leaf, index, value):
    stacked = _faulty(leaf, index, value)
    # beta = 0.34, m = 5 finite participants (0, 1, 3, 5, 6): floor(1.7) = 1 from each end (with
    # the faulty one counted, m = 6 would drop floor(2.04) = 2).
    out = robust.trimmed_mean(stacked, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]), 0.34)
    np.testing.assert_allclose(out['w'], [2.0, 1.0], rtol=1e-6)  # [1, 2, 3], [-2, 0, 5]
    np.testing.assert_allclose(out['b'], 7.0 / 3.0, rtol=1e-6)  # [1, 2, 4]
    # beta = 0.25, m = 4 finite (0, 1, 3, 5): floor(1.0) = 1 from each end.
    out = robust.trimmed_mean(stacked, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 0.25)
    np.testing.assert_allclose(out['w'], [1.5, 2.5], rtol=1e-6)  # [1, 2], [0, 5]
    np.testing.assert_allclose(out['b'], 1.5, rtol=1e-6)  # [1, 2]


@pytest.mark.parametrize('combine', [robust.coordinate_median, robust.trimmed_mean])
def test_only_faulty_participants_give_a_zero_update(combine):
    combine = (
        functools.partial(combine, trim_fraction=0.2) if combine is robust.trimmed_mean else combine
    )
    stacked = _faulty('w', (2, 0), np.nan)
    out = combine(stacked, jnp.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))


def test_robust_strategy_reports_the_excluded_updates_and_fedavg_does_not():
    from fedjax_med.aggregation import registry
    from tests.test_strategies import args, inputs

    stacked = {k: v[:4] for k, v in _faulty('w', (2, 1), np.inf).items()}
    for name, want in (('median', 1.0), ('trimmed_mean', 1.0), ('weighted', None)):
        c = base.get_base_config()
        c.server.aggregator = name
        out = registry.strategy_for(c, **args()).combine(
            stacked, inputs([1.0, 1.0, 1.0, 1.0]), jax.random.key(0), jnp.float32(1.0)
        )
        assert out.metrics.get('train/excluded_updates') == want, name


def test_one_outlier_moves_fedavg_but_not_the_robust_aggregates():
    honest = np.array([[0.9, -1.0], [1.0, -1.1], [1.1, -0.9], [1.05, -1.0], [0.95, -1.05]])
    stacked = {'w': jnp.asarray(np.vstack([honest, [1e6, 1e6]]), jnp.float32)}
    weights = jnp.ones(6)
    assert float(fedavg.weighted_mean(stacked, weights)['w'][0]) > 1e5
    lo, hi = honest.min(0), honest.max(0)
    for name in ('median', 'trimmed_mean'):  # m = 6, beta = 0.2: 1 dropped from each end
        out = np.asarray(fedavg.aggregator(name, trim_fraction=0.2).combine(stacked, weights)['w'])
        assert np.all((lo <= out) & (out <= hi)), (name, out)


def _reference(name, values, weights, trim_fraction):
    part = np.sort(values[np.asarray(weights) > 0], axis=0)
    if name == 'median':
        return np.median(part, axis=0)
    t = math.floor(trim_fraction * len(part))
    return part[t : len(part) - t].mean(axis=0)


@pytest.mark.parametrize('name', ['median', 'trimmed_mean'])
def test_varying_participation_under_jit_compiles_once(name):
    combine = fedavg.aggregator(name, trim_fraction=0.25).combine
    traces = []

    @jax.jit
    def aggregate(stacked, weights):
        traces.append(1)
        return combine(stacked, weights)

    values = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    for pattern in (
        [1, 1, 1, 1, 1, 1],
        [0, 1, 1, 0, 1, 1],
        [1, 0, 0, 0, 0, 1],
        [0, 0, 3, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
    ):
        weights = jnp.asarray(pattern, jnp.float32)
        out = aggregate({'w': jnp.asarray(values)}, weights)['w']
        np.testing.assert_allclose(
            out, _reference(name, values, pattern, 0.25), rtol=1e-6, atol=1e-7
        )
    assert len(traces) == 1


def build_round(
    aggregator: str, mesh, num_padded: int, steps: int = 2, batch: int = 4, fields=None
):
    """The linear-model round of tests/test_client.py with `aggregator` (trim_fraction 0.25) and
    other config `fields` ({'attack.mode': ...}); returns (round_fn, state, client_data,
    inputs_for(weights, malicious=None), per-hospital numpy deltas)."""
    config = base.get_base_config()
    config.local.optimizer = 'sgd'
    config.server.aggregator = aggregator
    config.server.trim_fraction = 0.25
    for dotted, value in (fields or {}).items():
        section, name = dotted.split('.')
        config[section][name] = value
    fn = rounds.build_round_fn(
        apply_fn=linear_apply, task=TASKS['chestxray14'], config=config, mesh=mesh
    )
    datas = [make_data(10 + k, steps * batch) for k in range(num_padded)]
    client_data = parallel.put_clients(
        {key: np.stack([d[key] for d in datas]) for key in ('image', 'label')}, mesh
    )
    indices = np.tile(
        np.arange(steps * batch, dtype=np.int32).reshape(steps, batch), (num_padded, 1, 1)
    )

    def inputs_for(weights, malicious=None):
        w = np.zeros(num_padded, np.float32)
        w[: len(weights)] = weights
        flags = () if malicious is None else np.zeros(num_padded, np.float32)
        if malicious is not None:
            flags[: len(malicious)] = malicious
        inputs = RoundInputs(
            indices=indices,
            mask=np.ones(indices.shape, np.float32),
            step_active=np.repeat(w[:, None] > 0, steps, axis=1),
            weights=w,
            expected_batch=np.full(num_padded, batch, np.float32),
            noise_multiplier=np.zeros(num_padded, np.float32),
            client_ids=np.arange(num_padded, dtype=np.int32),
            learning_rate=np.float32(0.5),
            malicious=flags,
        )
        return jax.device_put(inputs, parallel.round_inputs_sharding(mesh, inputs))

    params0 = init_params()
    deltas = [
        numpy_sgd(params0, d, indices[0], np.ones(indices[0].shape), 0.5, steps) for d in datas
    ]
    state = rounds.init_server_state(params0, config, num_padded, mesh)
    return fn, state, client_data, inputs_for, deltas


@pytest.mark.parametrize('name', ['median', 'trimmed_mean'])
def test_round_applies_the_robust_aggregate_and_compiles_once(name):
    fn, state, client_data, inputs_for, deltas = build_round(name, parallel.make_mesh(1), 5)
    weights = [8, 4, 0, 1, 1]  # m = 4; sizes do not matter, hospital 2 sits out
    state, _ = fn(state, client_data, inputs_for(weights), jax.random.key(0))
    # Server optimiser FedAvg with rate 1: params0 + the robust aggregate of the deltas.
    for k, p0 in init_params().items():
        expected = np.asarray(p0) + _reference(
            name, np.stack([d[k] for d in deltas]), weights, 0.25
        )
        np.testing.assert_allclose(state.params[k], expected, atol=1e-6)
    for r, weights in enumerate([[1, 1, 1, 1, 1], [0, 0, 2, 0, 0]], start=1):
        state, _ = fn(state, client_data, inputs_for(weights), jax.random.key(r))
    assert fn.num_traces == 1


def test_robust_round_on_one_and_eight_devices_gives_the_same_model():
    # 5 hospitals: unpadded on 1 device, padded with 3 inert hospitals and sharded on 8.
    out = run_python(
        """
        import jax
        import numpy as np
        from fedjax_med import parallel
        from tests.test_robust import build_round
        for name in ('median', 'trimmed_mean'):
            results = []
            for devices, padded in ((1, 5), (8, 8)):
                fn, state, data, inputs_for, _ = build_round(name, parallel.make_mesh(devices),
                                                             padded)
                for r, weights in enumerate([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]):
                    state, _ = fn(state, data, inputs_for(weights), jax.random.key(r))
                results.append(jax.tree.map(np.asarray, state.params))
            for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]),
                            strict=True):
                np.testing.assert_allclose(a, b, atol=1e-6)
        print('SAME_MODEL')
    """,
        devices=8,
    )
    assert 'SAME_MODEL' in out


def test_round_with_a_nan_hospital_excludes_it_and_the_health_check_lets_it_go_on(capsys):
    from fedjax_med import health

    fn, state, client_data, inputs_for, deltas = build_round('median', parallel.make_mesh(1), 5)
    client_data = dict(client_data, image=client_data['image'].at[2].set(jnp.nan))
    state, m = fn(state, client_data, inputs_for([1, 1, 1, 1, 1]), jax.random.key(0))
    m = jax.tree.map(np.asarray, m)
    assert int(m['train/nonfinite_updates']) == 1 and int(m['train/excluded_updates']) == 1
    for k, p0 in init_params().items():  # the median of hospitals 0, 1, 3, 4 (m = 4)
        honest = np.stack([deltas[j][k] for j in (0, 1, 3, 4)])
        np.testing.assert_allclose(
            state.params[k], np.asarray(p0) + np.median(honest, 0), atol=1e-6
        )
    config = chestxray14.get_config('smoke')
    config.server.aggregator = 'median'
    monitor = health.RoundMonitor(config, 1.0, [])
    monitor.check(0, m)  # no raise: the NaN update was left out and the parameters are finite
    monitor.check(1, m)
    (line,) = capsys.readouterr().err.splitlines()  # warned once
    assert line.startswith(
        'fedjax_med: warning: round 1: 1 hospital update(s) are not finite; '
        "config.server.aggregator='median' excluded them from the aggregate"
    )
    # FedAvg excludes nothing: the same round metrics without the exclusion still stop the run.
    config.server.aggregator = 'weighted'
    fedavg_metrics = {k: v for k, v in m.items() if k != 'train/excluded_updates'}
    with pytest.raises(
        FloatingPointError, match=r'^Round 1: 1 hospital update\(s\) are not finite'
    ):
        health.RoundMonitor(config, 1.0, []).check(0, fedavg_metrics)
    # Excluded, but the new parameters are not finite: still a stop.
    with pytest.raises(FloatingPointError, match='hospital update'):
        health.RoundMonitor(config, 1.0, []).check(0, {**m, 'train/param_norm': np.inf})


def test_smoke_run_with_the_median_has_a_finite_loss(tmp_path):
    c = chestxray14.get_config('smoke')
    c.num_rounds = 2
    c.server.aggregator = 'median'
    summary = train.run(c, str(tmp_path / 'median'))
    with open(os.path.join(tmp_path, 'median', 'metrics.jsonl')) as f:
        losses = [json.loads(line)['train/loss'] for line in f]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert summary['summary/round_traces'] == 1


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------


def _config(fields: dict):
    c = chestxray14.get_config('smoke')
    for dotted, value in fields.items():
        section, name = dotted.split('.')
        c[section][name] = value
    return c


def _problem(config) -> str:
    with pytest.raises(ValueError) as e:
        validate(config)
    return str(e.value)


@pytest.mark.parametrize('name', ['median', 'trimmed_mean'])
def test_robust_aggregator_with_secagg_is_a_clear_error(name):
    msg = _problem(_config({'server.aggregator': name, 'secagg.enabled': True}))
    assert f"config.server.aggregator='{name}' needs each hospital's update in the clear" in msg
    assert 'config.secagg.enabled=True' in msg and 'set config.secagg.enabled=False' in msg


def test_robust_aggregator_with_client_dp_is_a_clear_error():
    msg = _problem(
        _config({'server.aggregator': 'median', 'dp.mode': 'client', 'dp.noise_multiplier': 1.0})
    )
    assert "config.server.aggregator='median' cannot run under config.dp.mode='client'" in msg


@pytest.mark.parametrize('fraction', [-0.1, 0.5, 0.7])
def test_trim_fraction_out_of_range_is_an_error(fraction):
    msg = _problem(_config({'server.aggregator': 'trimmed_mean', 'server.trim_fraction': fraction}))
    assert f'config.server.trim_fraction={fraction!r} must be in [0, 0.5)' in msg
    with pytest.raises(ValueError, match='trim_fraction'):
        fedavg.aggregator('trimmed_mean', trim_fraction=fraction)


def test_unknown_aggregator_lists_every_allowed_name():
    msg = _problem(_config({'server.aggregator': 'bulyan'}))
    assert "use one of 'weighted', 'uniform', 'median', 'trimmed_mean'" in msg


def test_robust_aggregator_with_sample_dp_is_fine_and_without_a_federation_is_unchecked():
    validate(
        _config(
            {
                'server.aggregator': 'trimmed_mean',
                'dp.mode': 'sample',
                'local.sampling': 'poisson',
                'dp.noise_multiplier': 1.0,
            }
        )
    )
    for mode in ('centralized', 'local'):
        c = _config({'server.aggregator': 'median', 'secagg.enabled': True})
        c.mode = mode
        msg = _problem(c)  # SecAgg needs a federation; the unused aggregator is not blamed
        assert "needs config.mode='federated'" in msg and 'server.aggregator' not in msg
