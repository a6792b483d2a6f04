"""Norm bounding (Sun et al., "Can You Really Backdoor Federated Learning?", 2019): each hospital's
update is clipped to L2 norm at most B = `config.server.norm_bound` (over the whole update, every
leaf) before the example-weighted mean, so that no single hospital can move the model by more than
its weight times B, whatever it sends:

  delta_k <- delta_k * min(1, B / ||delta_k||),   mean = sum_k w_k delta_k / sum_k w_k.

It is the defence against boosted (scaled) updates, such as model-replacement backdoors. It does
not exclude anything: a non-finite update makes the mean non-finite (and `health.RoundMonitor`
stops the run), as with FedAvg.

**Under secure aggregation.** The clip needs one hospital's update only, so each hospital clips
its own update before it is encoded and masked (`secure_mean.SecureMean` with `norm_bound`), and
the server's SecAgg mean is then the norm-bounded weighted mean, to the fixed-point encoding's
precision (the aggregator's `update_bound` in registry.py says so; it needs no clear updates).
The bound then holds only for hospitals that run the clip: the server cannot check a masked
update's norm (that would take a proof of the bound, such as a zero-knowledge range proof, which
is not implemented). So in the attack simulation (fedjax_med/attacks.py) a malicious hospital
skips the clip under SecAgg, and only `secagg.clip`, the encoding's per-coordinate clamp, bounds
what it sends; in the clear the server clips every update itself. Client-level DP already clips
every update to `dp.clip_norm`, so `validate.py` refuses norm bounding with it.

The round metric `train/norm_bounded_fraction` (logged in the clear) is the fraction of
participants whose update was longer than B.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_med.aggregation import fedavg
from fedjax_med.aggregation.base import Combined, PyTree, StrategyArgs
from fedjax_med.state import RoundInputs


def update_norms(stacked: PyTree) -> jax.Array:
    """float32 [K]: each hospital's update's L2 norm over every leaf."""
    return jnp.sqrt(
        sum(jnp.sum(x**2, axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(stacked))
    )


def clip_updates(stacked: PyTree, bound: float) -> tuple[PyTree, jax.Array]:
    """(every row scaled by min(1, bound / its norm), the norms before clipping). Each row needs
    only its own hospital's update: the clip can run on the hospital's side."""
    norms = update_norms(stacked)
    scale = jnp.minimum(1.0, bound / jnp.maximum(norms, 1e-12))
    clipped = jax.tree.map(lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)), stacked)
    return clipped, norms


@dataclasses.dataclass(frozen=True)
class NormBound:
    bound: float  # B: server.norm_bound

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        del key  # deterministic
        clipped, norms = clip_updates(deltas, self.bound)
        taking_part = inputs.weights > 0
        bounded = jnp.sum(taking_part & (norms > self.bound)) / jnp.maximum(jnp.sum(taking_part), 1)
        return Combined(
            fedavg.weighted_mean(clipped, inputs.weights),
            clip_norm,
            {'train/norm_bounded_fraction': bounded.astype(jnp.float32)},
        )


def bound_of(config) -> float:
    """The L2 bound every hospital's update is clipped to (the aggregator's `update_bound`)."""
    return float(config.server.norm_bound)


def build(args: StrategyArgs) -> NormBound:
    return NormBound(bound=bound_of(args.config))
