"""FedAvg aggregation over the client axis (a weighted mean of stacked hospital updates), and
`aggregator(name)`: how the server weighs and combines updates in the clear, FedAvg or robust
(robust.py), for the built-in names `AGGREGATORS`. The round uses it through the plain strategy
(plain.py); registry.py lists every aggregator by name.

The mean is a plain reduction over axis 0; when the client axis is sharded over devices, XLA
turns it into the cross-device all-reduce.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_med.aggregation import robust

AGGREGATORS = ('weighted', 'uniform', *robust.ROBUST_AGGREGATORS)


def weighted_mean(stacked, weights: jax.Array):
    """sum_k w_k x_k / sum_k w_k over the leading axis; zero when every weight is zero."""
    total = jnp.sum(weights)
    scale = weights / jnp.maximum(total, 1e-12)
    return jax.tree.map(lambda x: jnp.tensordot(scale.astype(x.dtype), x, axes=1), stacked)


def example_weights(num_examples, participating):
    """Host weights of 'weighted': each participant's number of training examples."""
    return num_examples * participating


def participation_weights(num_examples, participating):
    """Host weights of 'uniform' and the unweighted aggregators: 1 per participant."""
    del num_examples
    return participating


class Aggregator(NamedTuple):
    """`weights(num_examples, participating)` -> aggregation weights [K] (host, once a round; 0 =
    not taking part) and `combine(stacked, weights)` -> the aggregated update (in the round)."""

    name: str
    weights: Callable
    combine: Callable


def aggregator(name: str, trim_fraction: float = 0.1) -> Aggregator:
    """'weighted' (by training examples, McMahan et al. 2017), 'uniform' (each hospital alike),
    or the unweighted robust 'median' / 'trimmed_mean' (`trim_fraction` from each end)."""
    if name == 'weighted':
        return Aggregator(name, example_weights, weighted_mean)
    if name == 'uniform':
        return Aggregator(name, participation_weights, weighted_mean)
    if name == 'median':
        return Aggregator(name, participation_weights, robust.coordinate_median)
    if name == 'trimmed_mean':
        robust.check_trim_fraction(trim_fraction)
        return Aggregator(
            name,
            participation_weights,
            functools.partial(robust.trimmed_mean, trim_fraction=trim_fraction),
        )
    raise ValueError(f'config.server.aggregator={name!r}: use one of {", ".join(AGGREGATORS)}.')
