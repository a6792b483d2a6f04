"""The plain strategy: the server sees every update in the clear and combines them with
`fedavg.aggregator(config.server.aggregator)`: the example-weighted or uniform mean
(`fedavg.weighted_mean`) or the robust coordinate-wise median / trimmed mean (robust.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from fedjax_med.aggregation import fedavg
from fedjax_med.aggregation.base import Combined, PyTree, StrategyArgs
from fedjax_med.state import RoundInputs


@dataclasses.dataclass(frozen=True)
class Plain:
    """`combine_fn(stacked [K, ...], weights [K]) -> pytree` over the round's weights."""

    combine_fn: Callable[[PyTree, jax.Array], PyTree]

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        del key  # deterministic
        return Combined(self.combine_fn(deltas, inputs.weights), clip_norm, {})


def build(args: StrategyArgs) -> Plain:
    server = args.config.server
    return Plain(fedavg.aggregator(server.aggregator, server.trim_fraction).combine)
