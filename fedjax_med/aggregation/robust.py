"""Byzantine-robust aggregation over the client axis: coordinate-wise median and trimmed mean.

Both combine a pytree of stacked hospital updates [K, ...] one coordinate at a time (Yin et al.,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018):

  coordinate_median  the median of the m participants' values (the mean of the two middle values
                     when m is even). Breakdown point 1/2: fewer than m/2 arbitrary (Byzantine)
                     hospitals cannot move any coordinate outside the honest values' range.
  trimmed_mean       drops the floor(beta * m) largest and the floor(beta * m) smallest values and
                     averages the rest, beta = `trim_fraction` in [0, 0.5). Breakdown point beta:
                     it withstands up to floor(beta * m) Byzantine hospitals; beta = 0 is the
                     plain (uniform) mean.

Both are called like `fedavg.weighted_mean(stacked, weights)` (`fedavg.aggregator` binds the
trimmed mean's `trim_fraction`; it is the `combine` of the round), but a weight only says who
takes part (> 0) and is otherwise ignored: every participant counts once, whatever its number of
examples (a hospital could claim any count, so weighting by it would hand an attacker the
aggregate). Non-participants and padded hospitals (weight 0) are excluded exactly: their values
are pushed to +inf before the per-coordinate sort and never indexed, so the participant count m
changes from round to round while the shapes, and the compiled round, stay the same. The sort
runs over the whole client axis, so when that axis is sharded XLA gathers it across devices.

**Faulty (non-finite) updates.** A participant whose update holds ANY value that is NaN or
infinite, in any leaf, is treated as faulty and excluded from the round's aggregate entirely,
like a non-participant: it does not count in m (so the median's middle ranks and the trimmed
mean's floor(beta * m) use the finite participants only), and every coordinate of the aggregate
comes from finite updates. (Without this a NaN, which also sorts last, or an infinite value would
shift the kept ranks onto the +inf placeholders of the absent hospitals.) When no participant's
update is finite the aggregate is zero. `excluded_count` is the number excluded this way; the
strategy reports it as the round metric `train/excluded_updates` (plain.py), and
`health.RoundMonitor` lets such a round go on when the new global parameters are finite.
`krum.py` applies the same rule (`valid_participants`).

Both need every hospital's update in the clear. Secure aggregation reveals only the sum of the
masked updates, so the server has nothing to sort; client-level DP (DP-FedAvg) adds Gaussian noise
calibrated to the sensitivity of the sum of clipped updates, and the accountant covers that noised
sum, not a median or a trimmed mean. `validate.py` rejects both combinations at start-up.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
ROBUST_AGGREGATORS = ('median', 'trimmed_mean')


def finite_rows(stacked: PyTree) -> jax.Array:
    """Bool [K]: whether every value of each hospital's update (every leaf) is finite."""
    return jnp.stack(
        [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(stacked)]
    ).all(axis=0)


def valid_participants(stacked: PyTree, weights: jax.Array) -> jax.Array:
    """Bool [K]: the hospitals a robust aggregate uses: taking part (weight > 0) with a finite
    update (see the module docstring)."""
    return (weights > 0) & finite_rows(stacked)


def excluded_count(stacked: PyTree, weights: jax.Array) -> jax.Array:
    """float32 scalar: participants excluded from a robust aggregate for a non-finite update."""
    return jnp.sum((weights > 0) & ~finite_rows(stacked), dtype=jnp.float32)


def _sorted_with_absent_last(x: jax.Array, taking_part: jax.Array) -> jax.Array:
    """Sorts every coordinate over the client axis, non-participants replaced by +inf (last)."""
    present = taking_part.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sort(jnp.where(present, x, jnp.inf), axis=0)


def check_trim_fraction(trim_fraction: float) -> None:
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(
            f'config.server.trim_fraction={trim_fraction!r} must lie in [0, 0.5): it '
            'is the fraction of values dropped from EACH end of every coordinate.'
        )


def coordinate_median(stacked: PyTree, weights: jax.Array) -> PyTree:
    """Per-coordinate median over the hospitals with weight > 0 and a finite update; zero when
    there is none."""
    taking_part = valid_participants(stacked, weights)
    m = jnp.sum(taking_part, dtype=jnp.int32)
    lower, upper = jnp.maximum((m - 1) // 2, 0), m // 2

    def median(x: jax.Array) -> jax.Array:
        ordered = _sorted_with_absent_last(x, taking_part)
        middle = (
            jax.lax.dynamic_index_in_dim(ordered, lower, keepdims=False)
            + jax.lax.dynamic_index_in_dim(ordered, upper, keepdims=False)
        ) / 2
        return jnp.where(m > 0, middle, 0).astype(x.dtype)

    return jax.tree.map(median, stacked)


def trimmed_mean(stacked: PyTree, weights: jax.Array, trim_fraction: float) -> PyTree:
    """Per-coordinate mean over the m hospitals with weight > 0 and a finite update after dropping
    floor(beta * m) values from each end (beta = `trim_fraction`); zero when there is none."""
    check_trim_fraction(trim_fraction)
    taking_part = valid_participants(stacked, weights)
    k = taking_part.shape[0]
    m = jnp.sum(taking_part, dtype=jnp.int32)
    # floor(beta * m) for every possible m, in float64 on the host: no float32 rounding at the
    # integer boundaries (e.g. beta = 0.1, m = 30).
    trim = jnp.asarray([math.floor(trim_fraction * n) for n in range(k + 1)], jnp.int32)[m]
    rank = jnp.arange(k)
    kept = (rank >= trim) & (rank < m - trim)
    count = jnp.maximum(m - 2 * trim, 1)

    def mean_of_kept(x: jax.Array) -> jax.Array:
        ordered = _sorted_with_absent_last(x, taking_part)
        keep = kept.reshape((-1,) + (1,) * (x.ndim - 1))
        return (jnp.sum(jnp.where(keep, ordered, 0), axis=0) / count).astype(x.dtype)

    return jax.tree.map(mean_of_kept, stacked)
