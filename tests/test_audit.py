"""The empirical privacy audit (privacy/auditing.py, data/canaries.py, auditor.py, audit.py):
the one-run bound against independent computations, canaries counted in the accounting, the
audit staying below the accountant's epsilon under DP and catching a broken mechanism, and
membership inference on unseen and on memorised examples."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, special, stats

from configs import chestxray14
from fedjax_med import (
    audit,
    auditor,
    checkpoint,
    experiment,
    host_round,
    parallel,
    report,
    train,
)
from fedjax_med.data import canaries as canaries_lib
from fedjax_med.data import sources
from fedjax_med.models import build_model
from fedjax_med.privacy import auditing
from fedjax_med.tasks import TASKS
from fedjax_med.validate import ConfigError, validate
from tests.conftest import REPO

# ---- the bound -------------------------------------------------------------------------------


@pytest.mark.parametrize('r', [5, 20, 50, 200])
def test_pure_dp_bound_with_every_guess_right_is_the_closed_form(r):
    # P[Binomial(r, q) >= r] = q^r = p  =>  q = p^(1/r), epsilon = logit(q).
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert auditing.epsilon_lower_bound(1000, r, r, 0.0, 0.05) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(('r', 'v'), [(100, 70), (100, 90), (500, 300), (40, 39)])
def test_pure_dp_bound_solves_the_binomial_tail_equation(r, v):
    eps = auditing.epsilon_lower_bound(1000, r, v, 0.0, 0.05)
    root = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, special.expit(e)) - 0.05, 0, 50)
    assert eps == pytest.approx(root, abs=1e-5) and eps <= root  # the safe side


def test_pure_dp_bound_is_zero_when_guesses_are_at_chance():
    assert auditing.epsilon_lower_bound(1000, 100, 50, 0.0, 0.05) == 0.0
    assert auditing.epsilon_lower_bound(1000, 100, 58, 0.0, 0.05) == 0.0  # within the tail


def _p_value_by_cdf(m, r, v, eps, delta):
    """Theorem 5.2's p-value written with binomial CDFs, term by term."""
    q = math.exp(eps) / (1 + math.exp(eps))
    beta = 1 - stats.binom.cdf(v - 1, r, q)
    alpha = max(
        (stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i
        for i in range(1, v + 1)
    )
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize(
    ('m', 'r', 'v', 'eps', 'delta'),
    [(1000, 100, 80, 1.0, 1e-5), (1000, 100, 95, 2.5, 1e-5), (200, 50, 50, 2.0, 1e-4)],
)
def test_approximate_dp_p_value_matches_a_direct_computation(m, r, v, eps, delta):
    assert auditing.p_value(m, r, v, eps, delta) == pytest.approx(
        _p_value_by_cdf(m, r, v, eps, delta), rel=1e-9, abs=1e-12
    )


def test_approximate_dp_bound_is_below_the_pure_one_and_solves_its_equation():
    m, r, v, p = 1000, 100, 95, 0.05
    pure = auditing.epsilon_lower_bound(m, r, v, 0.0, p)
    for delta in (1e-6, 1e-5, 1e-4):
        eps = auditing.epsilon_lower_bound(m, r, v, delta, p)
        assert 0 < eps < pure
        assert (
            _p_value_by_cdf(m, r, v, eps, delta) < p <= _p_value_by_cdf(m, r, v, eps + 1e-5, delta)
        )
    # A delta large against 1 / m leaves nothing to reject.
    assert auditing.epsilon_lower_bound(m, r, v, 1e-2, p) == 0.0


def test_canary_audit_takes_the_best_guess_count_at_the_bonferroni_confidence():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    scores = included + 0.01 * rng.standard_normal(200)  # perfectly separated
    fractions = (0.1, 0.5)
    got = auditing.canary_audit(
        scores, included, delta=1e-5, confidence=0.95, guess_fractions=fractions
    )
    p = 0.05 / len(fractions)
    expected = max(auditing.epsilon_lower_bound(200, r, r, 1e-5, p) for r in (20, 100))
    assert got['epsilon_lower'] == pytest.approx(expected)
    assert got['guesses'] == got['correct'] == 100 and got['canary_auc'] == 1.0
    # Scores unrelated to inclusion: no bound.
    noise = auditing.canary_audit(
        rng.random(200), included, delta=1e-5, confidence=0.95, guess_fractions=fractions
    )
    assert noise['epsilon_lower'] == 0.0


def test_guesses_are_the_highest_in_and_the_lowest_out():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    included = np.array([True, False, False, True, True, False])
    # IN: 0.9, 0.8 (both right); OUT: 0.1, 0.2 (0.2 is in: wrong).
    assert auditing.correct_guesses(scores, included, 2, 2) == 3
    assert auditing.guess_counts(100, 0.1) == (5, 5) and auditing.guess_counts(7, 1.0) == (3, 4)


# ---- membership inference metrics ---------------------------------------------------------------


def test_mia_metrics_on_known_scores():
    members, nonmembers = np.array([3.0, 4.0, 5.0, 0.5]), np.array([0.0, 1.0, 2.0, 0.5])
    m = auditing.mia_metrics(members, nonmembers)
    # 3, 4, 5 beat every non-member; 0.5 beats 0 and ties 0.5 (one half).
    assert m['auc'] == pytest.approx((3 * 4 + 1 + 0.5) / 16)
    # At FPR 0 the threshold 3 calls the three top members: TPR 3/4.
    assert m['tpr_at_fpr_1pct'] == m['tpr_at_fpr_0.1pct'] == 0.75
    assert auditing.tpr_at_fpr(members, nonmembers, 0.5) == 0.75
    # Down to 0.5, the tie: the member at 0.5 comes with non-members 2, 1 and 0.5.
    assert auditing.tpr_at_fpr(members, nonmembers, 0.75) == 1.0


def test_offline_lira_standardises_by_the_shadow_distribution():
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 3, 400)  # examples differ in difficulty
    shadows = mu + rng.standard_normal((8, 400))
    target = mu + rng.standard_normal(400) + np.where(np.arange(400) < 200, 1.5, 0.0)
    lira = auditing.lira_offline_scores(target, shadows)
    np.testing.assert_allclose(lira, (target - shadows.mean(0)) / np.std(shadows - shadows.mean(0)))
    # Calibrating by example beats the raw threshold on examples of unequal difficulty.
    assert auditing.auc(lira[:200], lira[200:]) > 0.8 > auditing.auc(target[:200], target[200:])


# ---- runs ---------------------------------------------------------------------------------------


def audit_config(**fields):
    """A 2-hospital run that memorises noise canaries quickly (small 8 px images, 10 local
    epochs a round at a high learning rate, 100 canaries against ~40 real examples a hospital)."""
    c = chestxray14.get_config('smoke')
    c.tensorboard = False
    c.data.num_clients = 2
    c.data.resolution = 8
    c.data.num_train, c.data.num_test = 80, 40
    c.model.width = 16
    c.local.epochs, c.local.learning_rate, c.local.schedule = 10.0, 1e-2, 'constant'
    c.num_rounds, c.eval_every, c.checkpoint_every = 6, 6, 6
    c.dp.delta = 1e-5  # the delta the bound (and, under DP, the accountant) is computed at
    c.audit.num_canaries = 100
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('__')
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


DP = {
    'dp__mode': 'sample',
    'local__sampling': 'poisson',
    'dp__target_epsilon': 1.0,
    'dp__clip_norm': 1.0,
    'dp__fast_clipping': True,
    'num_rounds': 5,
    'eval_every': 5,
    'checkpoint_every': 5,
}


def last_row(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return json.loads(f.readlines()[-1])


def test_canaries_count_in_the_hospitals_n_and_its_sampling_rate():
    c = audit_config(**DP)
    exp = experiment.build(c, parallel.make_mesh(1))
    can = exp.canaries
    n_in = int(can.included.sum())
    assert 0 < n_in < can.num and can.num == 100 and can.hospital == 0
    assert exp.sizes[0] == can.num_real + n_in  # the n that runs
    assert exp.privacy.q[0] == c.local.batch_size / exp.sizes[0]  # q_k = B / n_k, exactly
    assert exp.privacy.deltas[0] == 1e-5
    # The included canaries are hospital 0's last rows; the excluded ones are nowhere.
    data = np.asarray(exp.client_data['image'])
    np.testing.assert_array_equal(data[0, can.num_real : exp.sizes[0]], can.image[can.included])
    stored = {row.tobytes() for k in range(2) for row in data[k, : exp.sizes[k]]}
    assert not any(img.tobytes() in stored for img in can.image[~can.included])
    # Drawn from their own streams: the kind does not change which canaries are in.
    flipped = canaries_lib.make_canaries(
        audit_config(audit__canary='flipped').audit, exp.data.clients_train, c.seed
    )
    np.testing.assert_array_equal(flipped.included, can.included)


@pytest.fixture(scope='module')
def memorised(tmp_path_factory):
    """A non-private run whose released model has memorised its canaries."""
    workdir = str(tmp_path_factory.mktemp('audit') / 'nodp')
    train.run(audit_config(), workdir)
    return workdir


def test_non_private_run_memorises_its_canaries_and_the_audit_shows_it(memorised):
    row = last_row(memorised)
    assert row['privacy/epsilon'] is None and 'audit/accountant_epsilon' not in row
    assert row['audit/canary_auc'] > 0.9
    assert row['privacy/epsilon_audit_lower'] > 1.5
    # Membership inference on memorised examples (the canaries, IN vs OUT: members and
    # non-members of one distribution) is clearly above chance.
    exp, params, _, _ = audit.load(memorised)
    can = exp.canaries
    loss_fn = auditor.build_loss_fn(exp.apply_fn, exp.task)
    split = {'image': can.image, 'label': can.label}
    pick = lambda mask: {k: v[mask] for k, v in split.items()}
    mia, _, _ = auditor.membership_inference(
        loss_fn,
        params,
        pick(can.included),
        pick(~can.included),
        batch_size=64,
        mesh=exp.mesh,
        max_examples=1000,
        seed=0,
        hospital=0,
    )
    assert mia['auc'] > 0.9 and mia['tpr_at_fpr_1pct'] > 0.2


def test_audit_command_writes_audit_json_and_a_figure(memorised):
    result = audit.run(memorised, shadow_models=2)
    with open(os.path.join(memorised, 'audit.json')) as f:
        saved = json.load(f)
    assert set(saved['mia']) == {'hospital_0', 'hospital_1'}
    for m in saved['mia'].values():
        assert 0 <= m['auc'] <= 1 and m['num_members'] > 0 and m['num_nonmembers'] > 0
    # Canaries are not counted as the hospital's members: its own examples are.
    data = sources.load_federated(audit_config().data, 0)
    assert saved['mia']['hospital_0']['num_members'] == len(data.clients_train[0]['image'])
    rescored = saved['canary_audit']['rescored']
    assert rescored['epsilon_lower'] == pytest.approx(
        saved['canary_audit']['logged']['privacy/epsilon_audit_lower']
    )
    lira = saved['lira']
    assert lira['hospital'] == 'hospital_0' and lira['shadow_models'] == 2
    assert 0 <= lira['auc'] <= 1 and len(lira['shadow_threshold_auc']) == 2
    assert os.path.getsize(result['figure']) > 1000
    text = '\n'.join(audit.summary_lines(result))
    assert 'canary audit: epsilon >= ' in text and 'no DP' in text
    # The report's index.html shows it.
    section = report.audit_section(report.load_run(memorised), memorised)
    assert 'What an attacker can do: nodp' in section and 'src="audit_roc.png"' in section


def test_dp_run_audit_stays_below_the_accountants_epsilon(tmp_path):
    c = audit_config(**{**DP, 'num_rounds': 2, 'eval_every': 2, 'checkpoint_every': 2})
    train.run(c, str(tmp_path / 'dp'))
    row = last_row(tmp_path / 'dp')
    assert row['privacy/epsilon'] == pytest.approx(1.0, abs=1e-3)
    assert row['audit/accountant_epsilon'] <= row['privacy/epsilon'] + 1e-9
    assert row['privacy/epsilon_audit_lower'] <= row['audit/accountant_epsilon']


def test_a_broken_mechanism_is_caught(tmp_path, monkeypatch):
    # Test-only hook: the accountant is told the calibrated sigma, but every hospital trains
    # with none (the noise multipliers the round receives are zeroed).
    init = host_round.RoundPlanner.__init__

    def noiseless(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.noise_multiplier[:] = 0.0

    monkeypatch.setattr(host_round.RoundPlanner, '__init__', noiseless)
    train.run(audit_config(**DP), str(tmp_path / 'broken'))
    row = last_row(tmp_path / 'broken')
    assert row['privacy/noise_multiplier'] > 10  # what the accountant believes
    assert row['audit/accountant_epsilon'] == pytest.approx(1.0, abs=1e-3)
    assert row['privacy/epsilon_audit_lower'] > 1.5 * row['audit/accountant_epsilon']


def test_mia_on_a_model_that_never_saw_either_group_is_at_chance():
    # Hospital 0's training and test examples, attacked with a model trained on hospital 1
    # alone: both groups unseen, from one distribution.
    c = audit_config(
        data__num_train=1200,
        data__num_test=600,
        data__partition='iid',
        audit__num_canaries=0,
        num_rounds=1,
        local__epochs=1.0,
    )
    data = sources.load_federated(c.data, c.seed)
    params = audit.train_shadow(c, data, without=0, index=0)
    model = build_model(c.model, c.task)
    loss_fn = auditor.build_loss_fn(lambda p, x: model.apply(p, x), TASKS[c.task])
    mia, _, _ = auditor.membership_inference(
        loss_fn,
        params,
        data.clients_train[0],
        data.clients_test[0],
        batch_size=256,
        mesh=parallel.make_mesh(1),
        max_examples=2000,
        seed=0,
        hospital=0,
    )
    assert mia['num_members'] > 400 and mia['num_nonmembers'] > 200
    assert abs(mia['auc'] - 0.5) < 0.1


# ---- config and command-line errors -------------------------------------------------------------


def test_audit_fields_are_checked_up_front():
    def problems(**fields):
        with pytest.raises(ConfigError) as e:
            validate(audit_config(**fields))
        return e.value.problems

    assert problems(audit__hospital=2) == [
        'config.audit.hospital=2 must be a hospital index in 0..1 (config.data.num_clients=2).'
    ]
    (msg,) = problems(audit__canary='nois')
    assert "use one of 'noise', 'flipped'. Did you mean 'noise'?" in msg
    (msg,) = problems(dp__mode='client', dp__noise_multiplier=1.0)
    assert "config.dp.mode='client'" in msg
    (msg,) = problems(audit__guess_fractions=(0.5, 1.5))
    assert msg.startswith('config.audit.guess_fractions=(0.5, 1.5) must be')
    validate(audit_config(audit__num_canaries=0, audit__hospital=7))  # off: not checked


def test_a_checkpoint_from_before_the_audit_fields_resumes():
    current = json.loads(chestxray14.get_config('smoke').to_json_best_effort())
    saved = {k: v for k, v in current.items() if k != 'audit'}
    assert checkpoint.config_differences(saved, current) == []
    planted = json.loads(audit_config().to_json_best_effort())
    assert any(
        d.startswith('audit.num_canaries') for d in checkpoint.config_differences(saved, planted)
    )


def test_audit_command_errors_are_one_line_with_exit_status_2(tmp_path, memorised):
    out = subprocess.run(
        [sys.executable, '-m', 'fedjax_med.audit', f'--workdir={tmp_path / "nope"}'],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f'fedjax_med.audit: error: --workdir={tmp_path / "nope"}: no such folder; give the '
        'workdir of a finished training run.'
    ]
    (tmp_path / 'half').mkdir()
    (tmp_path / 'half' / 'config.json').write_text('{"num_rounds": 5}')
    with pytest.raises(audit.AuditError, match=r'--workdir=.*half holds no checkpoint; train'):
        audit.run(str(tmp_path / 'half'))
    # A run with rounds left to train (its config asks for more than were checkpointed).
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(memorised, unfinished)
    config = json.loads((unfinished / 'config.json').read_text())
    (unfinished / 'config.json').write_text(json.dumps({**config, 'num_rounds': 10}))
    with pytest.raises(
        audit.AuditError,
        match=r'unfinished has not finished \(checkpoint at round 6 of 10\); rerun its training',
    ):
        audit.run(str(unfinished))
