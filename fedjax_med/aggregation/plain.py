"""The plain strategy: the server sees every update in the clear and combines them with
`fedavg.aggregator(config.server.aggregator)`: the example-weighted or uniform mean
(`fedavg.weighted_mean`) or the robust coordinate-wise median / trimmed mean (robust.py).

The robust ones exclude a participant whose update is not finite (robust.py) and report how many
they excluded as the round metric `train/excluded_updates`; the means do not exclude anything (a
non-finite update makes the mean non-finite, and `health.RoundMonitor` stops the run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from fedjax_med.aggregation import fedavg, robust
from fedjax_med.aggregation.base import Combined, PyTree, StrategyArgs
from fedjax_med.state import RoundInputs


@dataclasses.dataclass(frozen=True)
class Plain:
    """`combine_fn(stacked [K, ...], weights [K]) -> pytree` over the round's weights.
    `excludes_nonfinite`: `combine_fn` leaves out non-finite updates (robust.py), and `combine`
    reports how many as `train/excluded_updates`."""

    combine_fn: Callable[[PyTree, jax.Array], PyTree]
    excludes_nonfinite: bool = False

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        del key  # deterministic
        metrics = (
            {'train/excluded_updates': robust.excluded_count(deltas, inputs.weights)}
            if self.excludes_nonfinite
            else {}
        )
        return Combined(self.combine_fn(deltas, inputs.weights), clip_norm, metrics)


def build(args: StrategyArgs) -> Plain:
    server = args.config.server
    return Plain(
        fedavg.aggregator(server.aggregator, server.trim_fraction).combine,
        excludes_nonfinite=server.aggregator in robust.ROBUST_AGGREGATORS,
    )
