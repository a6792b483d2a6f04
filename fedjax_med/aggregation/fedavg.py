"""FedAvg aggregation over the client axis: a weighted mean of stacked hospital updates.

Written as a plain reduction over axis 0; when the client axis is sharded over devices, XLA turns
it into the cross-device all-reduce.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def weighted_mean(stacked, weights: jax.Array):
    """sum_k w_k x_k / sum_k w_k over the leading axis; zero when every weight is zero."""
    total = jnp.sum(weights)
    scale = weights / jnp.maximum(total, 1e-12)
    return jax.tree.map(lambda x: jnp.tensordot(scale.astype(x.dtype), x, axes=1), stacked)


class Aggregator(NamedTuple):
    """init/apply pair: `weights(num_examples, participating)` -> aggregation weights [K]."""

    name: str
    weights: callable


def aggregator(name: str) -> Aggregator:
    """'weighted' (by training examples, McMahan et al. 2017) or 'uniform' (each hospital alike)."""
    if name == 'weighted':
        return Aggregator(name, lambda num_examples, participating: num_examples * participating)
    if name == 'uniform':
        return Aggregator(name, lambda num_examples, participating: participating)
    raise ValueError(f'config.server.aggregator={name!r}: use one of weighted, uniform.')
