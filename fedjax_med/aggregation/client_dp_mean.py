"""The client-level DP strategy (DP-FedAvg, `privacy/client_dp.py`): clip each update to
S = `clip_norm`, add N(0, (z S)^2) to the sum of the participants' clipped updates and divide by
the fixed `expected_clients`; with `dp.adaptive_clip`, move S towards the target quantile of the
update norms (its count noised with its own key).

Hospitals have uniform weight here, whatever `server.aggregator` says: a weight above 1 would
raise the sensitivity above S. `client_dp_secure_mean.py` is the same mechanism with the noise
added by the hospitals under secure aggregation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_med.aggregation.base import (
    KEY_CLIENT_DP,
    KEY_CLIENT_DP_COUNT,
    Combined,
    PyTree,
    StrategyArgs,
)
from fedjax_med.privacy import client_dp
from fedjax_med.state import RoundInputs


def client_dp_keys(round_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key of the update noise, key of the adaptive-clipping count noise) of client-level DP.

    The update noise splits its key over leaves and hospitals; the count noise must not draw
    from any of those keys, or the two releases would share noise that an observer could
    cancel. Both therefore branch from the round key directly.
    """
    return (
        jax.random.fold_in(round_key, KEY_CLIENT_DP),
        jax.random.fold_in(round_key, KEY_CLIENT_DP_COUNT),
    )


@dataclasses.dataclass(frozen=True)
class ClientDPMean:
    noise_multiplier: float  # z of the update (z_delta with adaptive clipping)
    expected_clients: float  # the fixed denominator m
    adaptive_clip: bool
    target_quantile: float
    clip_learning_rate: float
    count_noise_std: float

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        participating = (inputs.weights > 0).astype(jnp.float32)
        clipped, norms = client_dp.clip_client_updates(deltas, clip_norm)
        metrics = {
            'dp/unclipped_fraction': jnp.sum((norms <= clip_norm) * participating)
            / jnp.maximum(participating.sum(), 1)
        }
        mean_delta = self.noised_mean(clipped, participating, inputs, key, clip_norm)
        if self.adaptive_clip:
            clip_norm = client_dp.adaptive_clip_update(
                clip_norm,
                norms,
                participating,
                client_dp_keys(key)[1],
                target_quantile=self.target_quantile,
                learning_rate=self.clip_learning_rate,
                count_noise_std=self.count_noise_std,
                expected_clients=self.expected_clients,
            )
        return Combined(mean_delta, clip_norm, metrics)

    def noised_mean(
        self,
        clipped: PyTree,
        participating: jax.Array,
        inputs: RoundInputs,
        key: jax.Array,
        clip_norm: jax.Array,
    ) -> PyTree:
        """(sum of the clipped updates + N(0, (z S)^2)) / m, noised by the server."""
        del inputs
        return client_dp.noised_mean(
            clipped,
            participating,
            client_dp_keys(key)[0],
            clip_norm=clip_norm,
            noise_multiplier=self.noise_multiplier,
            expected_clients=self.expected_clients,
        )


def options(args: StrategyArgs) -> dict:
    """The fields of `ClientDPMean` from the run's config."""
    dp = args.config.dp
    return dict(
        noise_multiplier=args.client_noise_multiplier,
        expected_clients=args.expected_clients,
        adaptive_clip=dp.adaptive_clip,
        target_quantile=dp.target_quantile,
        clip_learning_rate=dp.clip_learning_rate,
        count_noise_std=dp.count_noise_std,
    )


def build(args: StrategyArgs) -> ClientDPMean:
    return ClientDPMean(**options(args))
