"""The aggregation strategies (fedjax_med/aggregation/) on small hand-made updates, which strategy a
config picks, and a toy aggregator added through the registry alone: valid in a config, used by
the round and by a whole (one-round) run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, chestxray14
from fedjax_med import parallel, rounds, streams, train
from fedjax_med.aggregation import (
    client_dp_mean,
    client_dp_secure_mean,
    plain,
    registry,
    secagg_host,
    secure,
    secure_mean,
)
from fedjax_med.aggregation.base import Combined
from fedjax_med.state import RoundInputs
from fedjax_med.validate import ConfigError, validate
from tests.test_robust import build_round

K = 4
# Four hospitals' updates with exact float32 arithmetic (multiples of 1/4).
DELTAS = {
    'w': np.array([[1.0, 2.0], [3.0, 4.0], [-2.0, 0.5], [0.25, -1.0]], np.float32),
    'b': np.array([[4.0], [0.0], [2.0], [-8.0]], np.float32),
}


def inputs(weights, secagg=()):
    w = np.asarray(weights, np.float32)
    return RoundInputs(
        indices=np.zeros((K, 1, 1), np.int32),
        mask=np.ones((K, 1, 1), np.float32),
        step_active=np.ones((K, 1), bool),
        weights=w,
        expected_batch=np.ones(K, np.float32),
        noise_multiplier=np.zeros(K, np.float32),
        client_ids=np.arange(K, dtype=np.int32),
        learning_rate=np.float32(0.1),
        secagg=secagg,
    )


def config(**fields):
    c = base.get_base_config()
    c.data.num_clients = K
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('__')
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def args(z=0.0, m=float(K)):
    return dict(client_noise_multiplier=z, expected_clients=m, single_device=True)


def combine(strategy, weights, clip_norm=1.0, secagg=(), key=0):
    out = strategy.combine(
        jax.tree.map(jnp.asarray, DELTAS),
        inputs(weights, secagg),
        jax.random.key(key),
        jnp.float32(clip_norm),
    )
    assert isinstance(out, Combined)
    return out


def weighted_mean(weights, deltas=DELTAS):
    w = np.asarray(weights, np.float64)
    return {k: np.tensordot(w / w.sum(), v.astype(np.float64), axes=1) for k, v in deltas.items()}


def clipped(clip_norm):
    """Each update clipped to L2 norm `clip_norm` (over the whole pytree), and the norms."""
    norms = np.sqrt(sum((v.astype(np.float64) ** 2).reshape(K, -1).sum(1) for v in DELTAS.values()))
    scale = np.minimum(1.0, clip_norm / norms)
    return {k: v * scale.reshape(-1, *[1] * (v.ndim - 1)) for k, v in DELTAS.items()}, norms


def secagg_inputs(c, participating, r=0):
    """The host protocol's device inputs for round r, as a run makes them."""
    device_inputs, _, _ = secagg_host.secagg_round(c, r, np.asarray(participating, bool), K)
    return device_inputs


# --- (a) each strategy on hand-made updates ------------------------------------------------------


def test_plain_weighted_mean_is_exact():
    s = registry.strategy_for(config(server__aggregator='weighted'), **args())
    assert isinstance(s, plain.Plain)
    out = combine(s, [1.0, 3.0, 0.0, 4.0], clip_norm=0.7)
    want = weighted_mean([1.0, 3.0, 0.0, 4.0])
    for k in DELTAS:
        np.testing.assert_array_equal(np.asarray(out.mean_delta[k]), want[k].astype(np.float32))
    assert float(out.clip_norm) == pytest.approx(0.7) and out.metrics == {}


def test_plain_robust_aggregators_are_the_coordinate_statistics():
    median = registry.strategy_for(config(server__aggregator='median'), **args())
    out = combine(median, [1.0, 1.0, 0.0, 1.0])  # hospitals 0, 1, 3
    np.testing.assert_array_equal(out.mean_delta['w'], [1.0, 2.0])
    np.testing.assert_array_equal(out.mean_delta['b'], [0.0])
    trimmed = registry.strategy_for(
        config(server__aggregator='trimmed_mean', server__trim_fraction=0.25), **args()
    )
    out = combine(trimmed, [1.0, 1.0, 1.0, 1.0])  # drops one value from each end
    np.testing.assert_array_equal(out.mean_delta['w'], [(1.0 + 0.25) / 2, (0.5 + 2.0) / 2])
    np.testing.assert_array_equal(out.mean_delta['b'], [(0.0 + 2.0) / 2])


@pytest.mark.parametrize('dropout', [0.0, 0.25])
def test_secure_mean_is_the_survivors_weighted_mean(dropout):
    c = config(secagg__enabled=True, secagg__clip=8.0, secagg__dropout_fraction=dropout)
    s = registry.strategy_for(c, **args())
    assert isinstance(s, secure_mean.SecureMean)
    weights = [1.0, 3.0, 2.0, 2.0]
    setup = secagg_inputs(c, np.ones(K, bool))
    survivor = np.asarray(setup.survivor, np.float64)
    assert survivor.sum() == K - round(dropout * K)
    out = combine(s, weights, secagg=setup)
    want = weighted_mean(np.asarray(weights) * survivor)
    # Fixed point: each hospital's term is rounded to 1/Q, the weight share as well.
    atol = 4 * K / secure.scale_for(8.0, K)
    for k in DELTAS:
        np.testing.assert_allclose(np.asarray(out.mean_delta[k]), want[k], atol=atol)


@pytest.mark.parametrize('adaptive', [False, True])
def test_client_dp_without_noise_is_the_clipped_mean(adaptive):
    c = config(
        dp__mode='client',
        dp__adaptive_clip=adaptive,
        dp__count_noise_std=0.0,
        dp__target_quantile=0.5,
        dp__clip_learning_rate=0.2,
    )
    s = registry.strategy_for(c, **args(z=0.0, m=3.0))
    assert type(s) is client_dp_mean.ClientDPMean
    weights = [5.0, 1.0, 2.0, 0.0]  # any positive weight counts as 1; only hospital 2 is unclipped
    out = combine(s, weights, clip_norm=3.0, key=5)
    want, norms = clipped(3.0)
    taking_part = np.asarray(weights) > 0
    for k in DELTAS:
        expected = want[k][taking_part].sum(0) / 3.0
        np.testing.assert_allclose(np.asarray(out.mean_delta[k]), expected, rtol=1e-6)
    unclipped = np.mean(norms[taking_part] <= 3.0)
    assert float(out.metrics['dp/unclipped_fraction']) == pytest.approx(unclipped)
    # Adaptive clipping: C exp(-eta (b_hat - gamma)), b_hat the unclipped fraction (no noise).
    new_clip = 3.0 * np.exp(-0.2 * (unclipped - 0.5)) if adaptive else 3.0
    assert float(out.clip_norm) == pytest.approx(new_clip, rel=1e-6)


def test_client_dp_under_secagg_without_noise_is_the_clipped_mean_of_survivors():
    c = config(dp__mode='client', secagg__enabled=True, secagg__dropout_fraction=0.25)
    s = registry.strategy_for(c, **args(z=0.0, m=float(K)))
    assert isinstance(s, client_dp_secure_mean.ClientDPSecureMean)
    setup = secagg_inputs(c, np.ones(K, bool), r=1)
    survivor = np.asarray(setup.survivor, bool)
    out = combine(s, np.ones(K), clip_norm=3.0, secagg=setup)
    want, _ = clipped(3.0)
    # Shares are encoded in units of S over [-1, 1] (z = 0): resolution S / Q per hospital.
    atol = 3.0 * 2 * K / secure.scale_for(1.0, K)
    for k in DELTAS:
        np.testing.assert_allclose(
            np.asarray(out.mean_delta[k]), want[k][survivor].sum(0) / K, atol=atol
        )


def test_strategy_for_reads_privacy_first():
    picks = {
        (): plain.Plain,
        (('secagg__enabled', True),): secure_mean.SecureMean,
        (('dp__mode', 'client'),): client_dp_mean.ClientDPMean,
        (
            ('dp__mode', 'client'),
            ('secagg__enabled', True),
        ): client_dp_secure_mean.ClientDPSecureMean,
    }
    for fields, cls in picks.items():
        c = config(server__aggregator='uniform', **dict(fields))
        assert type(registry.strategy_for(c, **args())) is cls
    with pytest.raises(ValueError, match="config.server.aggregator='bulyan'"):
        registry.strategy_for(config(server__aggregator='bulyan'), **args())


def test_random_stream_purposes_are_distinct_and_unchanged():
    # The values are part of every run's results (streams.py): a change shifts every draw.
    device = (
        streams.KEY_TRAIN,
        streams.KEY_SECAGG,
        streams.KEY_CLIENT_DP,
        streams.KEY_COMPRESS,
        streams.KEY_CLIENT_DP_COUNT,
    )
    assert device == (0, 1, 2, 3, 4)
    host = (streams.HOST_PARTICIPANTS, streams.HOST_BATCHES, streams.HOST_SECAGG)
    assert host == (1, 2, 3)
    data = [v for k, v in vars(streams).items() if k.startswith('DATA_')]
    assert len(data) == len(set(data)) == 12  # 10, and config.audit's two (data/canaries.py)
    # Everything that draws uses these names, not its own copies.
    assert secagg_host.HOST_SECAGG is streams.HOST_SECAGG
    assert rounds.KEY_TRAIN is streams.KEY_TRAIN and rounds.round_key is streams.round_key


# --- (b) a toy aggregator, added through the registry only ---------------------------------------


@dataclasses.dataclass(frozen=True)
class FirstHospital:
    """The update of the first hospital taking part, alone (records each trace)."""

    traces: list

    def combine(self, deltas, inputs, key, clip_norm):
        self.traces.append(jax.tree.map(jnp.shape, deltas))
        first = jnp.argmax(inputs.weights > 0)
        return Combined(jax.tree.map(lambda d: d[first], deltas), clip_norm, {})


@pytest.fixture
def toy():
    """Registers 'toy' (a list of its traces) for one test."""
    traces = []
    registry.register('toy', lambda strategy_args: FirstHospital(traces))
    yield traces
    del registry.AGGREGATORS['toy']


def test_toy_aggregator_is_unknown_until_registered():
    with pytest.raises(ConfigError, match="server.aggregator='toy' is not known"):
        validate(config(server__aggregator='toy'))


def test_toy_aggregator_is_valid_once_registered_and_needs_clear_updates(toy):
    validate(config(server__aggregator='toy'))
    for field in ('secagg__enabled', 'dp__mode'):
        c = config(server__aggregator='toy', **{field: True if 'secagg' in field else 'client'})
        with pytest.raises(ConfigError, match="server.aggregator='toy'"):
            validate(c)


def test_round_applies_the_toy_aggregate(toy):
    fn, state, client_data, inputs_for, deltas = build_round('toy', parallel.make_mesh(1), 5)
    params0 = jax.tree.map(np.asarray, state.params)
    state, _ = fn(state, client_data, inputs_for([0, 4, 1, 1, 0]), jax.random.key(0))
    for k, p0 in params0.items():  # FedAvg, rate 1: params0 + hospital 1's delta
        np.testing.assert_allclose(state.params[k], p0 + deltas[1][k], atol=1e-6)
    assert len(toy) == 1


def test_one_round_smoke_run_with_the_toy_aggregator(toy, tmp_path):
    c = chestxray14.get_config('smoke')
    c.num_rounds = 1
    c.server.aggregator = 'toy'
    summary = train.run(c, str(tmp_path / 'run'))
    assert summary['summary/round_traces'] == 1 and len(toy) == 1
    assert np.isfinite(summary['train/loss']) and summary['train/update_norm'] > 0
