"""The SecAgg strategy: the survivors' weighted mean through the secure sum (`secure.secure_sum`),
so that the server learns only the sum of the masked updates.

Each hospital sends (w_k / W) * delta_k and its weight share w_k / W as one extra coordinate
(W = the total weight of this round's cohort, public). Hospitals that drop out send nothing, so
the ratio of the two sums is the weighted mean of the survivors. The share, in [0, 1], travels as
share * secagg.clip, so that the per-coordinate clip of the encoding never cuts it, whatever
secagg.clip is.

With `norm_bound` > 0 (`server.aggregator='norm_bound'`, norm_bound.py) each hospital first clips
its own update to that L2 norm, before weighting and encoding, so the result is the norm-bounded
weighted mean. A hospital marked malicious by the attack simulation (`RoundInputs.malicious`)
skips that clip: the server cannot see a masked update's norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_med.aggregation import norm_bound as norm_bound_lib
from fedjax_med.aggregation import secure
from fedjax_med.aggregation.base import KEY_SECAGG, Combined, PyTree, StrategyArgs
from fedjax_med.state import RoundInputs


@dataclasses.dataclass(frozen=True)
class SecureMean:
    clip: float  # secagg.clip: the encoding's per-coordinate clip
    single_device: bool  # one device expands each pairwise mask once for both its hospitals
    norm_bound: float = 0.0  # > 0: each hospital clips its update to this L2 norm first

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        if self.norm_bound > 0:  # on each hospital's side, before anything is encoded
            clipped, _ = norm_bound_lib.clip_updates(deltas, self.norm_bound)
            if not isinstance(inputs.malicious, tuple):  # an attacker does not clip its own
                attacker = inputs.malicious > 0
                clipped = jax.tree.map(
                    lambda c, d: jnp.where(attacker.reshape((-1,) + (1,) * (d.ndim - 1)), d, c),
                    clipped,
                    deltas,
                )
            deltas = clipped
        participating = (inputs.weights > 0).astype(jnp.float32)
        share = inputs.weights / jnp.maximum(inputs.weights.sum(), 1e-12)
        scaled = {
            'delta': jax.tree.map(lambda d: d * share.reshape((-1,) + (1,) * (d.ndim - 1)), deltas),
            'weight': share * self.clip,
        }
        summed = secure.secure_sum(
            scaled,
            participating,
            inputs.secagg.survivor,
            jax.random.fold_in(key, KEY_SECAGG),
            inputs.secagg,
            clip=self.clip,
            scale=secure.scale_for(self.clip, participating.shape[0]),
            single_device=self.single_device,
            client_ids=inputs.client_ids,
        )
        weight = summed['weight'] / self.clip
        mean_delta = jax.tree.map(lambda s: s / jnp.maximum(weight, 1e-12), summed['delta'])
        return Combined(mean_delta, clip_norm, {})


def build(args: StrategyArgs, norm_bound: float = 0.0) -> SecureMean:
    """`norm_bound`: the aggregator's `update_bound` (registry.py), 0 for none."""
    return SecureMean(
        clip=args.config.secagg.clip, single_device=args.single_device, norm_bound=norm_bound
    )
