"""The aggregators by name (`config.server.aggregator`), and `strategy_for`: the one place that
picks how a run combines its hospitals' updates.

`strategy_for` looks at the privacy settings first. Client-level DP (`dp.mode='client'`) and
secure aggregation (`secagg.enabled`) each fix how updates are combined, and only then does
`server.aggregator` choose:

  dp.mode='client' and secagg.enabled   client_dp_secure_mean  (each hospital noises its share)
  dp.mode='client'                      client_dp_mean         (clipped sum + noise, / m)
  secagg.enabled                        secure_mean            (survivors' weighted mean)
  otherwise                             AGGREGATORS[server.aggregator].build

`server.aggregator` still sets the host weights under SecAgg ('weighted', 'uniform' or
'norm_bound'); client DP weighs every participant alike. An aggregator with `needs_clear_updates`
(the robust ones, Krum, and any new one unless it is the weighted mean of its weights, possibly of
updates each hospital bounds itself) is refused by `validate` with SecAgg or client DP. One with
an `update_bound` (norm_bound) has every hospital clip its own update to that L2 norm, which works
under SecAgg too: `secure_mean` clips before encoding.

  weighted, uniform       fedavg.py via plain.py   the (example-)weighted / uniform mean
  median, trimmed_mean    robust.py via plain.py   coordinate-wise, unweighted; non-finite excluded
  krum, multi_krum        krum.py                  the update(s) nearest their neighbours
  norm_bound              norm_bound.py            each update clipped to server.norm_bound, then
                                                   the example-weighted mean

A new aggregator is one new module with a `Strategy` (base.py) and its builder, plus one entry
in `AGGREGATORS`; `validate` takes the names from here. `register` adds one at run time (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import ml_collections
import numpy as np

from fedjax_med.aggregation import (
    client_dp_mean,
    client_dp_secure_mean,
    fedavg,
    krum,
    norm_bound,
    plain,
    secure_mean,
)
from fedjax_med.aggregation.base import Strategy, StrategyArgs

WeightsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class AggregatorSpec(NamedTuple):
    """One `config.server.aggregator` name."""

    build: Callable[[StrategyArgs], Strategy]  # the in-round combination, built once per run
    # Host, each round: (examples per hospital [K], participating 0/1 [K]) -> weights [K] (0 = not
    # taking part), `RoundInputs.weights`.
    weights: WeightsFn = fedavg.participation_weights
    # True: needs every update in the clear and un-noised (validate refuses SecAgg and client
    # DP). False only for the weighted mean of `weights`, which the SecAgg mean also computes.
    needs_clear_updates: bool = True
    # config -> the L2 norm every hospital clips its own update to before sending (applied on the
    # hospital's side under SecAgg, before encoding), or None.
    update_bound: Callable[[ml_collections.ConfigDict], float] | None = None


AGGREGATORS: dict[str, AggregatorSpec] = {
    'weighted': AggregatorSpec(plain.build, fedavg.example_weights, needs_clear_updates=False),
    'uniform': AggregatorSpec(plain.build, fedavg.participation_weights, needs_clear_updates=False),
    'median': AggregatorSpec(plain.build),
    'trimmed_mean': AggregatorSpec(plain.build),
    'krum': AggregatorSpec(krum.build_krum),
    'multi_krum': AggregatorSpec(krum.build_multi_krum),
    'norm_bound': AggregatorSpec(
        norm_bound.build,
        fedavg.example_weights,
        needs_clear_updates=False,
        update_bound=norm_bound.bound_of,
    ),
}


def register(
    name: str,
    build: Callable[[StrategyArgs], Strategy],
    *,
    weights: WeightsFn = fedavg.participation_weights,
    needs_clear_updates: bool = True,
    update_bound: Callable[[ml_collections.ConfigDict], float] | None = None,
) -> None:
    """Makes `name` a valid `config.server.aggregator` (validate reads `AGGREGATORS`)."""
    AGGREGATORS[name] = AggregatorSpec(build, weights, needs_clear_updates, update_bound)


def spec(name: str) -> AggregatorSpec:
    if name not in AGGREGATORS:
        raise ValueError(f'config.server.aggregator={name!r}: use one of {", ".join(AGGREGATORS)}.')
    return AGGREGATORS[name]


def strategy_for(
    config: ml_collections.ConfigDict,
    *,
    client_noise_multiplier: float,
    expected_clients: float,
    single_device: bool,
) -> Strategy:
    """The run's strategy (see the module docstring). `client_noise_multiplier` and
    `expected_clients` are client-level DP's z and m; `single_device`: the client axis is on one
    device."""
    args = StrategyArgs(config, client_noise_multiplier, expected_clients, single_device)
    if config.dp.mode == 'client':
        if config.secagg.enabled:
            return client_dp_secure_mean.build(args)
        return client_dp_mean.build(args)
    aggregator = spec(config.server.aggregator)
    if config.secagg.enabled:
        bound = aggregator.update_bound(config) if aggregator.update_bound else 0.0
        return secure_mean.build(args, norm_bound=bound)
    return aggregator.build(args)
