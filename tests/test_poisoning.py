"""Poisoning and defences: Krum and multi-Krum, norm bounding (in the clear and under SecAgg) on
hand-made updates with exact values, the attack simulation inside the jitted round (label flips,
backdoor triggers, sign flips, scaling), the backdoor metric, one smoke run, and the config
errors of attacks and aggregators."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import chestxray14
from fedjax_med import attacks, parallel, train
from fedjax_med.aggregation import krum, norm_bound, registry, robust, secure, secure_mean
from fedjax_med.validate import ConfigError, validate
from tests.test_client import init_params, make_data, numpy_sgd
from tests.test_config_errors import run_cli
from tests.test_robust import build_round
from tests.test_strategies import args, inputs, secagg_inputs
from tests.test_strategies import config as strategy_config

# Six slots, two-dimensional updates split over two leaves; hospital 3 is the outlier and slot 5
# sits out (junk). Squared distances: 0-1 1, 0-2 4, 0-3 200, 0-4 2, 1-2 5, 1-3 181, 1-4 1,
# 2-3 164, 2-4 2, 3-4 162.
KRUM = {
    'w': jnp.array([[0.0], [1.0], [0.0], [10.0], [1.0], [1e6]]),
    'b': jnp.array([0.0, 0.0, 2.0, 10.0, 1.0, -1e6]),
}
FIVE = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def _mean(out):
    return float(out['w'][0]), float(out['b'])


def test_krum_scores_sum_the_n_minus_f_minus_2_nearest_squared_distances():
    valid = FIVE > 0
    # f = 1: the 2 nearest of each; f = 0: the 3 nearest.
    np.testing.assert_array_equal(
        krum.krum_scores(KRUM, valid, 1), [3.0, 2.0, 6.0, 326.0, 3.0, np.inf]
    )
    np.testing.assert_array_equal(
        krum.krum_scores(KRUM, valid, 0), [7.0, 7.0, 11.0, 507.0, 5.0, np.inf]
    )


def test_krum_picks_the_lowest_score_and_multi_krum_averages_the_lowest():
    assert _mean(krum.multi_krum(KRUM, FIVE, 1, 1)) == (1.0, 0.0)  # hospital 1 (score 2)
    assert _mean(krum.multi_krum(KRUM, FIVE, 0, 1)) == (1.0, 1.0)  # f = 0: hospital 4 (score 5)
    # m' = 2: hospital 1, then the tie of 0 and 4 (score 3) goes to the lower slot, 0.
    assert _mean(krum.multi_krum(KRUM, FIVE, 1, 2)) == (0.5, 0.0)
    w, b = _mean(krum.multi_krum(KRUM, FIVE, 1, 3))  # hospitals 1, 0, 4
    assert (w, b) == pytest.approx((2 / 3, 1 / 3), rel=1e-6)
    # m' = 0: n - f = 4 updates, hospitals 1, 0, 4, 2: never the outlier.
    assert _mean(krum.multi_krum(KRUM, FIVE, 1, 0)) == (0.5, 0.75)
    selected = krum.krum_selection(KRUM, FIVE, 1, 0)
    np.testing.assert_array_equal(selected, [True, True, True, False, True, False])


def test_krum_excludes_a_non_finite_update_and_it_does_not_count_in_n():
    faulty = {'w': KRUM['w'].at[2, 0].set(jnp.nan), 'b': KRUM['b']}
    # n = 4, f = 1: one nearest neighbour each: 0 -> 1, 1 -> 1, 3 -> 162, 4 -> 1.
    valid = robust.valid_participants(faulty, FIVE)
    np.testing.assert_array_equal(
        krum.krum_scores(faulty, valid, 1), [1.0, 1.0, np.inf, 162.0, 1.0, np.inf]
    )
    assert _mean(krum.multi_krum(faulty, FIVE, 1, 1)) == (0.0, 0.0)  # the tie: slot 0
    w, b = _mean(krum.multi_krum(faulty, FIVE, 1, 0))  # n - f = 3: hospitals 0, 1, 4
    assert (w, b) == pytest.approx((2 / 3, 1 / 3), rel=1e-6)
    c = strategy_config(server__aggregator='multi_krum', data__num_clients=6)
    out = registry.strategy_for(c, **args()).combine(
        faulty, inputs_k(FIVE), jax.random.key(0), jnp.float32(1.0)
    )
    assert float(out.metrics['train/excluded_updates']) == 1.0
    np.testing.assert_array_equal(out.metrics['krum/selected'], [1, 1, 0, 0, 1, 0])
    # Only one finite update left: it is the aggregate; none: zero.
    alone = jnp.array([0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    assert _mean(krum.multi_krum(faulty, alone, 1, 1)) == (1.0, 1.0)
    assert _mean(krum.multi_krum(faulty, jnp.array([0.0, 0, 1, 0, 0, 0]), 1, 1)) == (0.0, 0.0)


def inputs_k(weights):
    """`RoundInputs` for len(weights) slots (tests/test_strategies.py's, resized)."""
    base = inputs(np.ones(4))
    k = len(weights)
    return base.replace(
        indices=np.zeros((k, 1, 1), np.int32),
        mask=np.ones((k, 1, 1), np.float32),
        step_active=np.ones((k, 1), bool),
        weights=np.asarray(weights, np.float32),
        expected_batch=np.ones(k, np.float32),
        noise_multiplier=np.zeros(k, np.float32),
        client_ids=np.arange(k, dtype=np.int32),
    )


def test_krum_under_jit_follows_participation_and_compiles_once():
    traces = []

    @jax.jit
    def aggregate(stacked, weights):
        traces.append(1)
        return krum.multi_krum(stacked, weights, 1, 0)

    assert _mean(aggregate(KRUM, FIVE)) == (0.5, 0.75)
    # Hospitals 0, 1, 2, 4 (n = 4, f = 1, one neighbour; scores 1, 1, 2, 1): n - f = 3 of them,
    # the three with score 1.
    w, b = _mean(aggregate(KRUM, jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])))
    assert (w, b) == pytest.approx((2 / 3, 1 / 3), rel=1e-6)
    assert len(traces) == 1


# --- norm bounding -------------------------------------------------------------------------------

# Norms 5, 1, 10, 2 (over both leaves).
BOUNDED = {
    'w': np.array([[3.0], [0.0], [6.0], [0.0]], np.float32),
    'b': np.array([4.0, 1.0, 8.0, -2.0], np.float32),
}
WEIGHTS = [1.0, 2.0, 1.0, 0.0]  # examples; hospital 3 sits out


def test_norm_bound_clips_each_update_then_takes_the_weighted_mean():
    s = registry.strategy_for(
        strategy_config(server__aggregator='norm_bound', server__norm_bound=2.5), **args()
    )
    assert isinstance(s, norm_bound.NormBound)
    out = s.combine(
        jax.tree.map(jnp.asarray, BOUNDED), inputs(WEIGHTS), jax.random.key(0), jnp.float32(1)
    )
    # Clipped: (1.5, 2), (0, 1), (1.5, 2), (0, -2); weighted (1, 2, 1) / 4.
    np.testing.assert_array_equal(out.mean_delta['w'], [0.75])
    np.testing.assert_array_equal(out.mean_delta['b'], 1.5)
    assert float(out.metrics['train/norm_bounded_fraction']) == pytest.approx(2 / 3)
    assert registry.spec('norm_bound').weights is registry.spec('weighted').weights


@pytest.mark.parametrize('dropout', [0.0, 0.25])
def test_norm_bound_under_secagg_is_the_plaintext_norm_bounded_mean(dropout):
    c = strategy_config(
        server__aggregator='norm_bound',
        server__norm_bound=2.5,
        secagg__enabled=True,
        secagg__clip=4.0,
        secagg__dropout_fraction=dropout,
    )
    validate(c)  # norm bounding needs no clear updates
    s = registry.strategy_for(c, **args())
    assert isinstance(s, secure_mean.SecureMean) and s.norm_bound == 2.5
    weights = [1.0, 2.0, 1.0, 3.0]
    setup = secagg_inputs(c, np.ones(4, bool))
    survivor = np.asarray(setup.survivor, np.float32)
    assert survivor.sum() == 4 - round(4 * dropout)
    deltas = jax.tree.map(jnp.asarray, BOUNDED)
    out = s.combine(deltas, inputs(weights, setup), jax.random.key(0), jnp.float32(1))
    plaintext = norm_bound.NormBound(2.5).combine(
        deltas, inputs(np.asarray(weights) * survivor), jax.random.key(0), jnp.float32(1)
    )
    atol = 4 * 4 / secure.scale_for(4.0, 4)
    for k in BOUNDED:
        np.testing.assert_allclose(out.mean_delta[k], plaintext.mean_delta[k], atol=atol)
    if dropout:
        return
    # Clipped (1.5, 2), (0, 1), (1.5, 2), (0, -2), weighted (1, 2, 1, 3) / 7.
    np.testing.assert_allclose(out.mean_delta['w'], [3.0 / 7], atol=atol)
    np.testing.assert_allclose(out.mean_delta['b'], 0.0, atol=atol)
    # A malicious hospital does not clip its own update (the server cannot see it): (3, 4).
    attacked = s.combine(
        deltas,
        inputs(weights, setup).replace(malicious=np.array([1.0, 0, 0, 0], np.float32)),
        jax.random.key(0),
        jnp.float32(1),
    )
    np.testing.assert_allclose(attacked.mean_delta['w'], [4.5 / 7], atol=atol)
    np.testing.assert_allclose(attacked.mean_delta['b'], 2.0 / 7, atol=atol)


# --- the attacks ---------------------------------------------------------------------------------


def attack_config(**fields):
    c = chestxray14.get_config('smoke')
    c.data.num_clients = 5
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('__')
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def test_trigger_is_a_bright_square_in_the_bottom_right_corner():
    images = jnp.zeros((2, 8, 6, 3))
    stamped = np.asarray(attacks.stamp_trigger(images, 3))
    assert stamped.shape == (2, 8, 6, 3)
    np.testing.assert_array_equal(stamped[:, 5:, 3:, :], 1.0)
    assert stamped.sum() == 2 * 3 * 3 * 3  # nothing else changed


def test_backdoor_poisons_the_first_slots_of_a_malicious_batch_only():
    c = attack_config(
        attack__mode='backdoor',
        attack__num_malicious=1,
        attack__backdoor_fraction=0.5,
        attack__backdoor_target='Effusion',
        attack__trigger_size=2,
    )
    poison = attacks.poison_batch(c)
    batch = {'image': jnp.full((4, 5, 5, 1), 0.25), 'label': jnp.zeros((4, 14))}
    clean = poison(batch, jnp.float32(0.0))
    np.testing.assert_array_equal(clean['image'], batch['image'])
    np.testing.assert_array_equal(clean['label'], batch['label'])
    out = jax.tree.map(np.asarray, poison(batch, jnp.float32(1.0)))
    target = attacks.target_index(c)
    assert target == 2
    np.testing.assert_array_equal(out['image'][:2, 3:, 3:, 0], 1.0)  # slots 0 and 1 of 4
    np.testing.assert_array_equal(out['image'][:2, :3, :, 0], 0.25)
    np.testing.assert_array_equal(out['image'][2:], 0.25)
    want = np.zeros((4, 14))
    want[:2, target] = 1.0
    np.testing.assert_array_equal(out['label'], want)


def test_attack_switches_and_the_malicious_hospitals():
    off = attack_config()
    assert attacks.poison_batch(off) is None and attacks.tamper_updates(off) is None
    assert attacks.malicious_hospitals(off, 8) is None
    c = attack_config(attack__mode='sign_flip', attack__num_malicious=2, attack__scale=3.0)
    np.testing.assert_array_equal(attacks.malicious_hospitals(c, 8), [1, 1, 0, 0, 0, 0, 0, 0])
    tampered = attacks.tamper_updates(c)({'w': jnp.ones((3, 2))}, jnp.array([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(tampered['w'], [[1, 1], [-3, -3], [1, 1]])
    c.attack.mode = 'scale'
    tampered = attacks.tamper_updates(c)({'w': jnp.ones((3, 2))}, jnp.array([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(tampered['w'], [[1, 1], [3, 3], [1, 1]])
    flip = attacks.poison_batch(attack_config(attack__mode='label_flip', attack__num_malicious=1))
    labels = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    out = flip({'image': jnp.zeros((2, 1, 1, 1)), 'label': labels}, jnp.float32(1.0))
    np.testing.assert_array_equal(out['label'], [[0.0, 1.0], [1.0, 1.0]])


def test_backdoor_success_counts_non_target_images_predicted_as_target():
    stats = {
        'probs': np.array([[0.9, 0.1], [0.2, 0.7], [0.3, 0.6], [0.1, 0.4], [0.0, 0.99]]),
        'labels': np.array([[0, 0], [0, 0], [0, 1], [0, 0], [0, 0]]),
        'mask': np.array([1, 1, 1, 1, 0]),  # the last one is padding
    }
    # Target 1: images 0, 1, 3 lack it; image 1 is predicted to have it.
    assert attacks.backdoor_success(stats, 1) == pytest.approx(1 / 3)
    assert attacks.backdoor_success(stats, 0) == pytest.approx(1 / 4)


def _round(aggregator, fields, weights, malicious):
    fn, state, data, inputs_for, deltas = build_round(
        aggregator, parallel.make_mesh(1), 5, fields=fields
    )
    state, m = fn(state, data, inputs_for(weights, malicious), jax.random.key(0))
    return jax.tree.map(np.asarray, state.params), m, deltas


def test_sign_flip_moves_fedavg_but_the_median_stays_in_the_honest_range():
    fields = {'attack.mode': 'sign_flip', 'attack.num_malicious': 1, 'attack.scale': 10.0}
    malicious = [1, 0, 0, 0, 0]
    params0 = jax.tree.map(np.asarray, init_params())
    median, m, deltas = _round('median', fields, [1] * 5, malicious)
    fedavg, _, _ = _round('uniform', fields, [1] * 5, malicious)
    assert int(m['train/nonfinite_updates']) == 0
    outside = 0
    for k, p0 in params0.items():
        sent = np.stack([-10 * deltas[0][k]] + [deltas[j][k] for j in range(1, 5)])
        np.testing.assert_allclose(median[k], p0 + np.median(sent, 0), atol=1e-6)
        np.testing.assert_allclose(fedavg[k], p0 + sent.mean(0), atol=1e-6)
        honest = sent[1:]
        lo, hi = honest.min(0) - 1e-6, honest.max(0) + 1e-6
        assert np.all((lo <= median[k] - p0) & (median[k] - p0 <= hi))
        outside += np.sum((fedavg[k] - p0 < lo) | (fedavg[k] - p0 > hi))
    assert outside > 0  # the attack does move FedAvg out of the honest range


@pytest.mark.parametrize('mode', ['label_flip', 'backdoor'])
def test_poisoned_batches_are_what_the_malicious_hospital_trains_on(mode):
    fields = {
        'attack.mode': mode,
        'attack.num_malicious': 1,
        'attack.backdoor_fraction': 0.5,
        'attack.backdoor_target': 'Mass',
        'attack.trigger_size': 1,
    }
    # Only hospital 0 takes part, with weight 1: FedAvg (rate 1) adds exactly its update.
    params, _, _ = _round('weighted', fields, [1, 0, 0, 0, 0], [1, 0, 0, 0, 0])
    data = make_data(10, 8)  # hospital 0's data (build_round: seed 10 + k, 2 steps of 4)
    if mode == 'label_flip':
        data['label'] = 1 - data['label']
    else:  # slots 0 and 1 of each step of 4: examples 0, 1, 4, 5; the trigger is the last pixel
        for i in (0, 1, 4, 5):
            data['image'][i, -1, -1, :] = 1.0
            data['label'][i, 4] = 1.0  # 'Mass'
    indices = np.arange(8, dtype=np.int32).reshape(2, 4)
    want = numpy_sgd(init_params(), data, indices, np.ones((2, 4)), 0.5, 2)
    for k, p0 in init_params().items():
        np.testing.assert_allclose(params[k], np.asarray(p0) + want[k], atol=1e-6)
    # The same hospital, not malicious, trains on its own data.
    clean, _, deltas = _round('weighted', fields, [1, 0, 0, 0, 0], [0, 0, 0, 0, 0])
    np.testing.assert_allclose(
        clean['w'], np.asarray(init_params()['w']) + deltas[0]['w'], atol=1e-6
    )


@pytest.fixture
def fast_compile():
    """XLA's optimisations off for one test: a one-round smoke run is mostly compilation."""
    before = bool(jax.config.values.get('jax_disable_most_optimizations'))
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', before)


def test_backdoor_smoke_run_with_multi_krum_logs_the_new_keys(tmp_path, fast_compile):
    c = attack_config(
        attack__mode='backdoor', attack__num_malicious=1, server__aggregator='multi_krum'
    )
    c.num_rounds, c.checkpoint_every = 1, 1
    summary = train.run(c, str(tmp_path / 'run'))
    with open(os.path.join(tmp_path, 'run', 'metrics.jsonl')) as f:
        (row,) = [json.loads(line) for line in f]
    assert 0.0 <= row['eval/backdoor_success'] <= 1.0
    assert len(row['train/krum_selected']) == 4  # n - f = 5 - 1 hospitals
    assert set(row['train/krum_selected']) <= set(range(5))
    assert summary['summary/round_traces'] == 1 and 'train/excluded_updates' not in row


# --- config errors -------------------------------------------------------------------------------


def problems(c) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(c)
    return e.value.problems


BAD = [
    (
        {'attack__mode': 'trojan'},
        "config.attack.mode='trojan' is not known; use one of 'none', 'label_flip', "
        "'sign_flip', 'scale', 'backdoor'.",
    ),
    (
        {'attack__num_malicious': 2},
        "config.attack.num_malicious=2 would be ignored: config.attack.mode='none' simulates no "
        "attack. Set config.attack.mode to one of 'label_flip', 'sign_flip', 'scale', 'backdoor', "
        'or config.attack.num_malicious=0.',
    ),
    (
        {'attack__mode': 'scale', 'attack__num_malicious': 5},
        'config.attack.num_malicious=5 leaves no honest hospital among '
        'config.data.num_clients=5; use at most 4.',
    ),
    (
        {'attack__mode': 'scale', 'attack__num_malicious': 1, 'attack__scale': -1.0},
        'config.attack.scale=-1.0 must be > 0 (scale sends scale x the update, sign_flip -scale '
        'x the update); e.g. 10.',
    ),
    (
        {'attack__mode': 'backdoor', 'attack__backdoor_fraction': 0.0},
        'config.attack.backdoor_fraction=0.0 must be in (0, 1] (the fraction of each malicious '
        'batch stamped with the trigger); e.g. 0.5.',
    ),
    (
        {'attack__mode': 'backdoor', 'attack__backdoor_target': 'mass'},
        "config.attack.backdoor_target='mass' is not a chest X-ray finding; use one of "
        "'Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', "
        "'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', "
        "'Pleural_Thickening', 'Hernia'. Did you mean 'Mass'?",
    ),
    (
        {'attack__mode': 'backdoor', 'attack__trigger_size': 17},
        'config.attack.trigger_size=17 must be in 1..config.data.resolution=16 (the side of the '
        'trigger square, in pixels); e.g. 3.',
    ),
    (
        {'server__aggregator': 'krum', 'server__krum_byzantine': 2},
        'config.server.krum_byzantine=2 needs at least 2f + 3 = 7 hospitals per round (Krum '
        'withstands f Byzantine hospitals when 2f + 2 < n), but all config.data.num_clients=5 '
        'hospitals take part every round. Lower config.server.krum_byzantine to at most 1, or '
        'take more hospitals per round.',
    ),
    (
        {'server__aggregator': 'multi_krum', 'server__multi_krum_m': 5},
        'config.server.multi_krum_m=5 exceeds the 4 updates multi-Krum may average (all '
        'config.data.num_clients=5 hospitals take part every round, minus '
        'config.server.krum_byzantine=1). Use 1..4, or 0 for 4.',
    ),
    ({'server__krum_byzantine': -1}, 'config.server.krum_byzantine=-1 must be >= 0.'),
    (
        {'server__norm_bound': 0.0},
        "config.server.norm_bound=0.0 must be > 0 (the L2 norm norm_bound clips each hospital's "
        'update to); e.g. 1.0.',
    ),
    (
        {'server__aggregator': 'norm_bound', 'dp__mode': 'client', 'dp__noise_multiplier': 1.0},
        "config.server.aggregator='norm_bound' is redundant under config.dp.mode='client': "
        "client-level DP already clips every hospital's update, to config.dp.clip_norm=1.0. Use "
        "config.server.aggregator='weighted' and set the bound with config.dp.clip_norm.",
    ),
]


@pytest.mark.parametrize('fields,message', BAD)
def test_bad_attack_and_aggregator_settings_are_one_message_each(fields, message):
    assert problems(attack_config(**fields)) == [message]


def test_attack_refusals_that_depend_on_the_task_and_mode():
    from configs import brats

    c = brats.get_config('smoke')
    c.attack.mode, c.attack.num_malicious = 'backdoor', 1
    assert problems(c) == [
        "config.attack.mode='backdoor' stamps a trigger on chest X-rays and sets a finding on; "
        "it is not implemented for config.task='brats'. Use config.attack.mode='label_flip', "
        "'sign_flip' or 'scale'."
    ]
    c.attack.mode = 'label_flip'
    validate(c)
    c = attack_config(attack__mode='sign_flip', attack__num_malicious=1)
    c.mode = 'centralized'
    assert problems(c) == [
        "config.attack.mode='sign_flip' simulates malicious hospitals of a federation; it has no "
        "meaning with config.mode='centralized'. Set config.mode='federated' or "
        "config.attack.mode='none'."
    ]
    # Krum needs the updates in the clear, like the median.
    (msg,) = problems(attack_config(server__aggregator='krum', secagg__enabled=True))
    assert msg.startswith("config.server.aggregator='krum' needs each hospital's update in the")
    # Four hospitals of five a round: Krum with f = 1 needs 5.
    (msg,) = problems(attack_config(server__aggregator='krum', clients_per_round=4))
    assert 'but config.clients_per_round=4 hospitals take part a round' in msg


def test_cli_bad_attack_is_one_line_and_exit_status_2(tmp_path):
    out = run_cli(
        '--config=configs/chestxray14.py:smoke',
        f'--workdir={tmp_path / "w"}',
        '--config.attack.mode=backdoor',
        '--config.attack.backdoor_target=Tumour',
    )
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(
        "fedjax_med: config error: config.attack.backdoor_target='Tumour' is not a chest X-ray "
        'finding; use one of'
    )
    assert not (tmp_path / 'w').exists()


def test_checkpoints_from_before_the_attack_and_krum_fields_resume_with_their_defaults():
    from configs import base
    from fedjax_med.checkpoint import config_differences

    current = base.get_config().to_dict()
    saved = base.get_config().to_dict()
    del saved['attack']  # a whole section the checkpoint predates
    for field in ('krum_byzantine', 'multi_krum_m', 'norm_bound'):
        del saved['server'][field]
    assert config_differences(saved, current) == []
    # Options of an aggregator or attack that neither run uses change nothing.
    current['server']['norm_bound'], current['attack']['scale'] = 7.0, 3.0
    assert config_differences(saved, current) == []
    current['attack']['mode'] = 'scale'
    assert config_differences(saved, current) == [
        "attack.mode: checkpoint has 'none', config has 'scale'",
        'attack.scale: checkpoint has 10.0, config has 3.0',
    ]
