"""Tests for fedjax_med.privacy.accounting and the epsilon CLI (host-side, dp-accounting)."""

import json
import os
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

from fedjax_med.privacy import accounting

MNIST = dict(dataset_size=60000, batch_size=150, noise_multiplier=1.3, epochs=15, delta=1e-5)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_matches_tf_privacy_published_value():
    # TF Privacy's compute_dp_sgd_privacy for this setting reports epsilon = 0.7242 (RDP).
    eps = accounting.compute_dp_sgd_epsilon(**MNIST, accountant='rdp')
    assert abs(eps - 0.7242) < 1e-3


def test_steps_and_epochs_agree():
    by_epochs = accounting.compute_dp_sgd_epsilon(**MNIST)
    kwargs = {k: v for k, v in MNIST.items() if k != 'epochs'}
    by_steps = accounting.compute_dp_sgd_epsilon(**kwargs, steps=6000)
    assert by_epochs == by_steps
    with pytest.raises(ValueError, match='exactly one of epochs'):
        accounting.compute_dp_sgd_epsilon(**MNIST, steps=10)


def test_dp_sgd_event_structure():
    event = accounting.dp_sgd_event(0.01, 1.1, 7)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 7
    )


def test_pld_is_tighter_than_rdp():
    event = accounting.dp_sgd_event(150 / 60000, 1.3, 6000)
    rdp_eps = accounting.epsilon(event, 1e-5, 'rdp')
    pld_eps = accounting.epsilon(event, 1e-5, 'pld')
    assert pld_eps <= rdp_eps
    assert 0.5 * rdp_eps < pld_eps  # Same mechanism: tighter, but not wildly different.


def test_unknown_accountant_raises():
    with pytest.raises(ValueError, match='accountant must be one of'):
        accounting.epsilon(accounting.dp_sgd_event(0.1, 1.0, 1), 1e-5, 'moments')


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_calibration_round_trips(accountant):
    q, steps, delta, target = 0.1, 20, 1e-5, 1.0
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=target,
        sampling_probability=q,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )
    eps = accounting.epsilon(accounting.dp_sgd_event(q, sigma, steps), delta, accountant)
    assert eps <= target * (1 + 1e-6)
    assert abs(eps - target) < 0.01 * target
    # A slightly smaller noise must miss the target: the calibration is tight, not just valid.
    smaller = accounting.epsilon(accounting.dp_sgd_event(q, 0.98 * sigma, steps), delta, accountant)
    assert smaller > target


def test_impossible_target_raises_helpful_error():
    with pytest.raises(ValueError) as info:
        accounting.calibrate_noise_multiplier(
            target_epsilon=1e-9, sampling_probability=1.0, steps=10**12, delta=1e-5
        )
    message = str(info.value)
    for part in ('target_epsilon=1e-09', 'q=1.0', 'steps=1000000000000', 'Raise target_epsilon'):
        assert part in message
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match='target_epsilon must be > 0'):
            accounting.calibrate_noise_multiplier(
                target_epsilon=bad, sampling_probability=0.1, steps=10, delta=1e-5
            )


def test_hospital_accountant_composes_steps_per_hospital():
    qs, z, delta = [0.02, 0.05, 0.1], 1.1, [1e-5, 1e-6, 1e-5]
    acct = accounting.HospitalAccountant(qs, z, delta)
    np.testing.assert_array_equal(acct.epsilons(), [0.0, 0.0, 0.0])
    rounds = [np.array([5, 0, 3]), np.array([5, 0, 0]), np.array([2, 0, 4])]
    previous = acct.epsilons()
    for steps in rounds:
        predicted = acct.epsilon_after(steps)
        acct.record(steps)
        now = acct.epsilons()
        np.testing.assert_array_equal(predicted, now)
        assert np.all(now >= previous)
        previous = now
    totals = np.sum(rounds, axis=0)
    np.testing.assert_array_equal(acct.steps, totals)
    assert now[1] == 0.0  # Never ran: no privacy spent.
    for k in (0, 2):
        want = accounting.epsilon(accounting.dp_sgd_event(qs[k], z, int(totals[k])), delta[k])
        assert now[k] == pytest.approx(want, rel=1e-12)
        assert now[k] > 0
    assert acct.max_epsilon() == max(now)
    # epsilon_after predicts without recording.
    assert np.all(acct.epsilon_after(10) > now)
    np.testing.assert_array_equal(acct.steps, totals)


def test_hospital_accountant_state_round_trip():
    acct = accounting.HospitalAccountant([0.01, 0.03], 0.9, 1e-5, accountant='rdp')
    acct.record(np.array([4, 7]))
    state = json.loads(json.dumps(acct.state_dict()))  # Must survive plain serialisation.
    restored = accounting.HospitalAccountant.from_state_dict(state)
    np.testing.assert_array_equal(restored.steps, acct.steps)
    np.testing.assert_array_equal(restored.epsilons(), acct.epsilons())
    restored.record(np.array([1, 0]))
    assert restored.epsilons()[0] > acct.epsilons()[0]


def test_hospital_accountant_accounts_each_hospital_with_its_own_noise():
    qs, sigmas, delta = [0.05, 0.2], [2.0, 0.8], 1e-5
    acct = accounting.HospitalAccountant(qs, sigmas, delta)
    acct.record(np.array([30, 12]))
    for k in (0, 1):
        want = accounting.epsilon(accounting.dp_sgd_event(qs[k], sigmas[k], [30, 12][k]), delta)
        assert acct.epsilons()[k] == pytest.approx(want, rel=1e-12)
    restored = accounting.HospitalAccountant.from_state_dict(
        json.loads(json.dumps(acct.state_dict()))
    )
    np.testing.assert_array_equal(restored.epsilons(), acct.epsilons())
    # A checkpoint written when one sigma was shared stored it as a float.
    old = dict(acct.state_dict(), noise_multiplier=0.8)
    np.testing.assert_array_equal(
        accounting.HospitalAccountant.from_state_dict(old).noise_multipliers, [0.8, 0.8]
    )
    with pytest.raises(ValueError, match='noise_multiplier has 3 entries for 2 hospitals'):
        accounting.HospitalAccountant(qs, [1.0, 1.0, 1.0], delta)


def test_hospital_accountant_rejects_bad_input():
    with pytest.raises(ValueError, match='delta has 1 entries for 2 hospitals'):
        accounting.HospitalAccountant([0.1, 0.2], 1.0, [1e-5])
    acct = accounting.HospitalAccountant([0.1, 0.2], 1.0, 1e-5)
    with pytest.raises(ValueError, match='non-negative'):
        acct.record(np.array([1, -1]))
    with pytest.raises(ValueError):
        acct.record(np.array([1, 2, 3]))


def test_client_level_epsilon_events():
    kwargs = dict(noise_multiplier=1.2, rounds=50, delta=1e-5)
    full = accounting.client_level_epsilon(num_clients=8, clients_per_round=8, **kwargs)
    gaussian = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.2), 50)
    assert full == pytest.approx(accounting.epsilon(gaussian, 1e-5))
    sampled = accounting.client_level_epsilon(num_clients=20, clients_per_round=5, **kwargs)
    assert sampled == pytest.approx(
        accounting.epsilon(accounting.dp_sgd_event(0.25, 1.2, 50), 1e-5)
    )
    assert sampled < full
    fixed = accounting.client_level_epsilon(
        num_clients=20, clients_per_round=5, cohort_sampling='fixed_size', **kwargs
    )
    assert 0 < fixed < np.inf
    with pytest.raises(ValueError, match="only supported by accountant='rdp'"):
        accounting.client_level_epsilon(
            num_clients=20,
            clients_per_round=5,
            cohort_sampling='fixed_size',
            accountant='pld',
            **kwargs,
        )
    with pytest.raises(ValueError, match='clients_per_round'):
        accounting.client_level_epsilon(num_clients=4, clients_per_round=5, **kwargs)


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run(
        [sys.executable, '-m', 'fedjax_med.privacy.epsilon', *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )


def test_cli_json_epsilon_and_calibration():
    common = ['--dataset_size=60000', '--batch_size=150', '--epochs=15', '--delta=1e-5']
    out = run_cli(*common, '--noise_multiplier=1.3', '--json')
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert abs(result['epsilon'] - 0.7242) < 1e-3
    assert result['steps'] == 6000 and result['noise_multiplier'] == 1.3

    out = run_cli(*common, '--target_epsilon=0.7242', '--json')
    assert out.returncode == 0, out.stderr
    assert abs(json.loads(out.stdout)['noise_multiplier'] - 1.3) < 0.01

    out = run_cli(*common, '--noise_multiplier=1.3')
    assert out.returncode == 0 and 'epsilon = 0.724' in out.stdout


def test_cli_reports_missing_flags():
    out = run_cli('--batch_size=150', '--epochs=1', '--noise_multiplier=1.0')
    assert out.returncode != 0
    assert '--dataset_size' in out.stderr and '--delta' in out.stderr


def test_calibration_does_not_flood_the_log_with_unconverged_order_warnings(caplog):
    """Large q: dp-accounting leaves out RDP orders whose series does not converge and warns for
    each; a calibration used to print hundreds of those lines into a run's output."""
    import logging

    with caplog.at_level(logging.WARNING):
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=3.0, sampling_probability=0.52, steps=30, delta=1e-4
        )
    assert sigma > 0
    assert not [r for r in caplog.records if 'failed to converge' in r.getMessage()]
    # The filter is gone afterwards: other absl warnings still show.
    from absl import logging as absl_logging

    with caplog.at_level(logging.WARNING):
        absl_logging.warning('failed to converge: a message from elsewhere')
    assert [r for r in caplog.records if 'from elsewhere' in r.getMessage()]
