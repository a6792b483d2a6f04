"""Client-level DP under secure aggregation (distributed DP): each hospital clips its update to S,
adds its share N(0, (z / sqrt(m))^2) of the noise to delta / S before masking
(`client_dp.distributed_noise_std`), and the shares go through `secure.secure_sum`; the server
multiplies the sum by S / m. The server never sees an un-noised sum. Clipping, its metric and
adaptive clipping are those of `client_dp_mean.ClientDPMean`.

The shares are encoded in units of S over a range wide enough for their noise
(`_NOISE_RANGE_SIGMAS`); `secagg.clip` applies to the plain SecAgg mean only.
"""

from __future__ import annotations

import dataclasses

import jax

from fedjax_med.aggregation import client_dp_mean, secure
from fedjax_med.aggregation.base import KEY_SECAGG, PyTree, StrategyArgs
from fedjax_med.privacy import client_dp
from fedjax_med.privacy.dp_sgd import add_gaussian_noise
from fedjax_med.state import RoundInputs

# Each noised share is encoded in units of the clip norm S over [-R, R] with
# R = 1 + _NOISE_RANGE_SIGMAS * z / sqrt(m): a clipped update has coordinates in [-1, 1]
# (|coordinate| <= L2 norm <= S) and the share's noise has std z / sqrt(m), so a share is clamped
# only when its noise exceeds 12 standard deviations (probability 2 Phi(-12) < 4e-33 per
# coordinate). A clamp would make the sum's noise smaller than the accountant assumes.
_NOISE_RANGE_SIGMAS = 12.0


@dataclasses.dataclass(frozen=True)
class ClientDPSecureMean(client_dp_mean.ClientDPMean):
    single_device: bool = True  # one device expands each pairwise mask once for both hospitals

    def noised_mean(
        self,
        clipped: PyTree,
        participating: jax.Array,
        inputs: RoundInputs,
        key: jax.Array,
        clip_norm: jax.Array,
    ) -> PyTree:
        """Each hospital's noised share of delta / S, securely summed, times S / m."""
        share_std = client_dp.distributed_noise_std(
            self.noise_multiplier, 1.0, self.expected_clients
        )
        enc_range = 1.0 + _NOISE_RANGE_SIGMAS * share_std
        nkey = client_dp_mean.client_dp_keys(key)[0]
        # Updates are float32 (flax's parameter dtype), for which add_gaussian_noise's draw in
        # float32 is the draw in the leaf's dtype.
        noised = jax.vmap(
            lambda d, i: add_gaussian_noise(
                jax.tree.map(lambda x: x / clip_norm, d), jax.random.fold_in(nkey, i), share_std
            )
        )(clipped, inputs.client_ids)
        summed = secure.secure_sum(
            noised,
            participating,
            inputs.secagg.survivor,
            jax.random.fold_in(key, KEY_SECAGG),
            inputs.secagg,
            clip=enc_range,
            scale=secure.scale_for(enc_range, participating.shape[0]),
            single_device=self.single_device,
            client_ids=inputs.client_ids,
        )
        return jax.tree.map(lambda s: s * clip_norm / self.expected_clients, summed)


def build(args: StrategyArgs) -> ClientDPSecureMean:
    return ClientDPSecureMean(**client_dp_mean.options(args), single_device=args.single_device)
