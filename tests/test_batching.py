"""Poisson batch slots (data/batching.py): no hospital overflows `max_batch` more often than the
documented per-step bound, the largest hospitals included."""

import numpy as np
import pytest
from scipy import stats

from fedjax_med.data import batching


def _step_overflow(batch_size, n, max_batch):
    """Exact P(Binomial(n, min(1, B / n)) > max_batch)."""
    return stats.binom.sf(max_batch, n, min(1.0, batch_size / n))


def test_largest_hospital_stays_within_the_bound():
    # The smallest hospital has n <= B (q = 1, no spread at all); sizing the batch for it gave
    # B + 1 = 33 slots, which the 3000-example hospital overflows in about 38% of its steps.
    sizes, batch = [30, 1000, 3000], 32
    for max_batch in (
        batching.poisson_max_batch(batch, sizes),
        batching.poisson_max_batch(batch, min(sizes)),  # the call without sizes
        batching.poisson_max_batch(batch),
    ):
        assert _step_overflow(batch, 3000, max_batch) <= batching.POISSON_TAIL
        assert _step_overflow(batch, 1000, max_batch) <= batching.POISSON_TAIL


@pytest.mark.parametrize(
    'batch,sizes,tail',
    [
        (32, [30, 1000, 3000], 1e-9),
        (32, [391, 1034, 477, 246, 853], 1e-9),
        (16, [112, 392, 696, 160, 240], 1e-9),
        (8, [5, 8, 9, 40, 20000], 1e-12),
        (64, [64, 65, 3000, 20000], 1e-6),
        (4, [1, 2, 3], 1e-9),
    ],
)
def test_every_hospital_within_the_bound_and_max_batch_is_the_smallest_such(batch, sizes, tail):
    max_batch = batching.poisson_max_batch(batch, sizes, tail)
    for n in sizes:
        for m in (n, n + 1):  # the hospital and a neighbouring dataset with one more patient
            assert _step_overflow(batch, m, max_batch) <= tail, (n, m, max_batch)
            assert batching.overflow_probability(batch, m, max_batch) <= tail
    # Exact: one slot fewer breaks the bound for some hospital (or its neighbour).
    assert max(_step_overflow(batch, m, max_batch - 1) for n in sizes for m in (n, n + 1)) > tail
    # The size-free (Poisson) bound covers them all.
    assert batching.poisson_max_batch(batch, tail=tail) >= max_batch


@pytest.mark.parametrize('batch', [1, 8, 32, 100])
def test_size_free_bound_covers_every_hospital_size(batch):
    max_batch = batching.poisson_max_batch(batch)
    for n in [1, batch, batch + 1, 2 * batch, 10 * batch, 1000 * batch, 10**7]:
        assert _step_overflow(batch, n, max_batch) <= batching.POISSON_TAIL, n


def test_sampler_does_not_truncate_the_large_hospitals():
    sizes, batch, epochs = [30, 1000, 3000], 32, 1.0
    max_batch = batching.poisson_max_batch(batch, sizes)
    num_steps = max(batching.steps_per_round(n, batch, epochs) for n in sizes)
    for r in range(3):
        out = batching.poisson_batches(
            sizes,
            batch,
            epochs,
            num_steps,
            max_batch,
            lambda k, r=r: np.random.default_rng([0, r, k]),
        )
        assert out.overflow == 0
        assert out.indices.shape == (3, num_steps, max_batch)
        # The mask holds the whole draw: mean batch size near B for the large hospitals.
        kept = out.mask.sum(-1)[2][out.step_active[2]]
        assert abs(kept.mean() - batch) < 3


def test_run_tail_keeps_whole_run_overflow_next_to_delta():
    sizes, batch, epochs, rounds = [391, 1034, 477, 246, 853], 32, 3.0, 20
    steps = [batching.steps_per_round(n, batch, epochs) for n in sizes]
    deltas = np.array([1 / (10 * n) for n in sizes])
    default = batching.poisson_max_batch(batch, sizes)
    # The default per-step bound alone is not negligible over a run next to delta.
    assert (
        batching.run_overflow_probability(batch, sizes, default, steps, rounds) > 1e-3 * deltas
    ).any()
    for epsilon, factor in ((None, 1.0), (3.0, 1 + np.exp(3.0))):
        tail = batching.run_overflow_tail(steps, rounds, deltas, epsilon=epsilon)
        max_batch = batching.poisson_max_batch(batch, sizes, tail)
        p_run = batching.run_overflow_probability(batch, sizes, max_batch, steps, rounds)
        assert (factor * p_run <= 1e-3 * deltas).all()
        assert max_batch > default


def test_tail_must_be_a_probability():
    with pytest.raises(ValueError, match='tail'):
        batching.poisson_max_batch(32, [100], tail=0.0)
