"""Sample-level noise calibration of a run (privacy/plan.py): each hospital's sigma and epsilon."""

import math

import numpy as np
import pytest

from configs import base
from fedjax_med.data import batching
from fedjax_med.privacy import accounting
from fedjax_med.privacy import plan as privacy_plan


def _setup(sizes, *, per_hospital=True, target=3.0, noise=0.0, rounds=4, batch=32, epochs=1.0):
    c = base.get_base_config()
    c.num_rounds = rounds
    c.local.batch_size, c.local.epochs, c.local.sampling = batch, epochs, 'poisson'
    c.dp.mode, c.dp.target_epsilon, c.dp.noise_multiplier = 'sample', target, noise
    c.dp.noise_per_hospital = per_hospital
    sizes = np.asarray(sizes)
    steps = np.array([batching.steps_per_round(n, batch, epochs) for n in sizes])
    return privacy_plan.PrivacyPlan(c, sizes, steps), steps


def _run_all_rounds(setup, steps, rounds):
    for _ in range(rounds):
        assert setup.check_budget(steps) is None
        setup.record(steps)
    return np.asarray(setup.metrics()['privacy/epsilon_per_hospital'])


def test_each_hospital_gets_the_smallest_sigma_that_ends_at_the_target():
    sizes = [60, 250, 1000]
    setup, steps = _setup(sizes)
    sigmas = setup.noise_multipliers
    # Larger hospitals sample a smaller fraction per step: they need less noise.
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    eps = _run_all_rounds(setup, steps, 4)
    np.testing.assert_allclose(eps, 3.0, rtol=1e-3)
    assert eps.max() <= 3.0 * (1 + 1e-6)
    for k, n in enumerate(sizes):
        # The same sigma from the accountant's own calibration, and 1% less noise overshoots.
        q, delta = min(1.0, 32 / n), 1 / (10 * n)
        want = accounting.calibrate_noise_multiplier(
            target_epsilon=3.0, sampling_probability=q, steps=int(steps[k]) * 4, delta=delta
        )
        assert sigmas[k] == pytest.approx(want, rel=1e-9)
        less = accounting.epsilon(accounting.dp_sgd_event(q, 0.99 * sigmas[k], 4 * steps[k]), delta)
        assert less > 3.0
    m = setup.metrics()
    assert m['privacy/noise_multiplier'] == pytest.approx(sigmas.max())
    assert m['privacy/noise_multiplier_per_hospital'] == pytest.approx(list(sigmas))
    assert setup.check_budget(steps) is not None  # a fifth round would exceed the target


def test_one_shared_sigma_is_the_largest_and_leaves_the_others_below_the_target():
    setup, steps = _setup([60, 250, 1000], per_hospital=False)
    per_hospital, _ = _setup([60, 250, 1000])
    np.testing.assert_allclose(setup.noise_multipliers, per_hospital.noise_multipliers.max())
    eps = _run_all_rounds(setup, steps, 4)
    assert eps[0] == pytest.approx(3.0, rel=1e-3) and eps[1] < 2.9 and eps[2] < 2.9


def test_a_given_noise_multiplier_is_used_by_every_hospital():
    setup, steps = _setup([60, 250], target=0.0, noise=1.3)
    np.testing.assert_array_equal(setup.noise_multipliers, [1.3, 1.3])
    eps = _run_all_rounds(setup, steps, 2)
    for k, n in enumerate([60, 250]):
        want = accounting.epsilon(
            accounting.dp_sgd_event(min(1.0, 32 / n), 1.3, 2 * steps[k]), 1 / (10 * n)
        )
        assert eps[k] == pytest.approx(want, rel=1e-12)
    assert math.isfinite(setup.metrics()['privacy/epsilon'])
