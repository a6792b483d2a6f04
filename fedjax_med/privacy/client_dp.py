"""Client-level DP for federated averaging: clip each hospital's update, noise the sum.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models")
protects a whole hospital's contribution: every participating hospital's model delta is clipped
to L2 norm S, the deltas are summed with uniform weights, Gaussian noise N(0, (z S)^2) is added
and the sum is divided by a FIXED denominator, the expected number of participating hospitals.
The adaptive clipping of Andrew et al. 2021 ("Differentially Private Learning with Adaptive
Clipping") tracks a target quantile of the update norms with a privately estimated count.

All functions are pure and jittable and work on STACKED updates: pytrees whose leaves have a
leading client axis K, plus a `participating` vector float[K] (0 = absent this round). They run
inside the one jitted round; the accounting (`accounting.client_level_epsilon`) runs on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_med.privacy.dp_sgd import add_gaussian_noise, clip_by_global_norm_per_example

PyTree = Any


def clip_client_updates(deltas: PyTree, clip_norm: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """Clips each client's update to global L2 norm `clip_norm`.

    Args:
        deltas: pytree with leading client axis K on every leaf.
        clip_norm: S > 0.

    Returns:
        (clipped deltas, pre-clip norms float32[K]); updates already within S are unchanged.
    """
    return clip_by_global_norm_per_example(deltas, clip_norm)


def _participation_indicator(participating: jax.Array) -> jax.Array:
    # Uniform weights: any positive weight counts as 1, because a weight above 1 would raise the
    # sensitivity above S and break the accounting.
    return jnp.asarray(participating) > 0


def noised_mean(
    clipped_deltas: PyTree,
    participating: jax.Array,
    key: jax.Array,
    *,
    clip_norm: float | jax.Array,
    noise_multiplier: float | jax.Array,
    expected_clients: float | jax.Array,
) -> PyTree:
    """DP-FedAvg aggregate: (sum of participating deltas + N(0, (z S)^2)) / expected_clients.

    The denominator is fixed (not the realised number of participants) so that one client's
    presence changes the output by at most S / expected_clients, the sensitivity the accountant
    assumes. With z = 0 this is the uniform mean scaled by (participants / expected_clients).

    Args:
        clipped_deltas: output of `clip_client_updates` (leading axis K).
        participating: float/bool [K]; > 0 = took part this round (treated as 0/1).
        key: PRNG key for the noise (one draw, shared by the whole model).
        clip_norm: S, the bound the deltas were clipped to.
        noise_multiplier: z for the update. With adaptive clipping pass
            `effective_noise_multiplier(z, count_noise_std)`, not z.
        expected_clients: the fixed denominator, e.g. the cohort size m (or q K).

    Returns:
        pytree without the client axis.
    """
    indicator = _participation_indicator(participating)
    summed = jax.tree.map(
        lambda d: jnp.sum(jnp.where(indicator.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0), axis=0),
        clipped_deltas,
    )
    std = jnp.where(noise_multiplier == 0, 0.0, noise_multiplier * clip_norm)
    noised = add_gaussian_noise(summed, key, std)
    return jax.tree.map(lambda x: x / jnp.asarray(expected_clients, x.dtype), noised)


def adaptive_clip_update(
    clip_norm: float | jax.Array,
    norms: jax.Array,
    participating: jax.Array,
    key: jax.Array,
    *,
    target_quantile: float,
    learning_rate: float,
    count_noise_std: float | jax.Array,
    expected_clients: float | jax.Array,
) -> jax.Array:
    """Geometric quantile tracking of the clip norm (Andrew et al. 2021, Algorithm 1).

        b_hat = (sum_i p_i (1[norm_i <= C] - 1/2) + N(0, sigma_b^2)) / expected_clients + 1/2
        C_new = C * exp(-learning_rate * (b_hat - target_quantile))

    Each client reports 1[norm_i <= C] - 1/2, in {-1/2, +1/2}, instead of the raw bit, as in the
    paper (Sec. 3) and TFF's QuantileEstimatorQuery: the count then has sensitivity 1/2, which is
    what `effective_noise_multiplier` assumes. When the number of participants equals
    `expected_clients` this is exactly (#{norm_i <= C} + noise) / expected_clients.

    Args:
        clip_norm: current C (scalar).
        norms: pre-clip update norms float[K] (from `clip_client_updates`, measured against C).
        participating: float/bool [K]; > 0 = took part (treated as 0/1).
        key: PRNG key for the count noise.
        target_quantile: gamma in [0, 1], the fraction of updates that should be unclipped.
        learning_rate: eta of the geometric update.
        count_noise_std: sigma_b, std of the noise on the (centred) clipped count.
        expected_clients: fixed denominator, as in `noised_mean`.

    Returns:
        the new clip norm (float32 scalar), always > 0.
    """
    indicator = _participation_indicator(participating)
    below = jnp.where(indicator, (norms <= clip_norm).astype(jnp.float32) - 0.5, 0.0)
    noise = count_noise_std * jax.random.normal(key, (), jnp.float32)
    b_hat = (jnp.sum(below) + noise) / expected_clients + 0.5
    return jnp.asarray(clip_norm, jnp.float32) * jnp.exp(-learning_rate * (b_hat - target_quantile))


def effective_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier for the model update when adaptive clipping spends part of the budget.

    Andrew et al. 2021 (Sec. 3.1): releasing the update with z_delta and the centred clipped
    count (sensitivity 1/2) with std sigma_b is, for privacy, the same as one Gaussian mechanism
    with noise multiplier z, where

        z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    Accounting uses the configured z (pass z to `accounting.client_level_epsilon`); the update
    noise in `noised_mean` uses z_delta (> z). With count_noise_std = inf (no count release)
    z_delta = z; z = 0 (non-private run) gives 0.

    Raises:
        ValueError: if 2 sigma_b <= z: the count alone would then use the whole budget.
    """
    z, sigma_b = float(noise_multiplier), float(count_noise_std)
    if z < 0 or sigma_b < 0:
        raise ValueError(
            f'noise_multiplier ({z}) and count_noise_std ({sigma_b}) must be non-negative.'
        )
    if z == 0:
        return 0.0
    if 2 * sigma_b <= z:
        raise ValueError(
            f'Adaptive clipping impossible: count_noise_std={sigma_b} must exceed '
            f'noise_multiplier/2={z / 2} (z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 needs '
            '2 sigma_b > z). Increase count_noise_std (e.g. to expected_clients / 20 as in '
            'Andrew et al.), or raise noise_multiplier, or disable adaptive clipping.'
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def distributed_noise_std(
    noise_multiplier: float | jax.Array, clip_norm: float | jax.Array, num_clients: float
) -> float | jax.Array:
    """Per-client noise std for distributed DP under secure aggregation.

    Each of n clients adds N(0, (z S)^2 / n) to its clipped update before masking, so the
    securely aggregated sum carries N(0, (z S)^2), the noise the accountant assumes, without any
    party seeing an un-noised update. Assumptions, stated plainly:
      * honest-but-curious clients: each adds its share faithfully; a client that skips its
        noise (or colludes and subtracts its own share) lowers the protection of the others;
      * all n clients finish: if clients drop out after noising, the sum carries only
        (n_survivors / n) (z S)^2 and the true noise multiplier is z sqrt(n_survivors / n),
        lower than accounted. Either account with the minimum expected survivors as n, or
        over-provision the shares.

    Works on Python numbers (host) and on traced values, e.g. an adaptive clip norm inside jit.

    Returns:
        z * S / sqrt(n), a standard deviation (not a variance).
    """
    if isinstance(num_clients, int | float) and num_clients < 1:
        raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
    return noise_multiplier * clip_norm / num_clients**0.5
