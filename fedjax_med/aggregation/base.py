"""The aggregation interface: a `Strategy` turns the round's stacked hospital updates into the one
update the server optimiser applies.

`registry.strategy_for(config, ...)` picks the strategy once per run, and the jitted round calls
its `combine(deltas, inputs, key, clip_norm)`:

  deltas     pytree of the hospitals' (compressed) updates, leading client axis K on every leaf;
  inputs     the round's `state.RoundInputs` (weights [K], 0 = not taking part; client ids;
             SecAgg arrays);
  key        the round key: a strategy draws only from `fold_in(key, purpose)` with its own
             purposes below, never from another use's key (docs/ARCHITECTURE.md,
             "Explicit randomness");
  clip_norm  the client-level DP clip norm of this round (`ServerState.clip_norm`).

It returns `Combined`: the update without the client axis, the clip norm for the next round
(changed only by adaptive clipping) and extra round metrics.

A strategy is built from `StrategyArgs`, once per run, outside jit; `combine` runs at trace time
inside the round, so it must be jittable and may not branch on traced values in Python.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import ml_collections

from fedjax_med.state import RoundInputs

# Purposes of the round-key branches the strategies draw from: fold_in(round_key, purpose),
# named with every other purpose in streams.py.
from fedjax_med.streams import KEY_CLIENT_DP, KEY_CLIENT_DP_COUNT, KEY_SECAGG  # noqa: F401

PyTree = Any


class Combined(NamedTuple):
    """What `Strategy.combine` returns."""

    mean_delta: PyTree  # the aggregated update (no client axis), for the server step
    clip_norm: jax.Array  # the client-level DP clip norm for the next round
    metrics: dict[str, jax.Array]  # extra round metrics (e.g. 'dp/unclipped_fraction'), or {}


class Strategy(Protocol):
    """How the server combines one round's hospital updates (see the module docstring)."""

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined: ...


@dataclasses.dataclass(frozen=True)
class StrategyArgs:
    """Everything a strategy may be built from (static for the run)."""

    config: ml_collections.ConfigDict
    client_noise_multiplier: float  # z of client-level DP (0 without)
    expected_clients: float  # client-level DP's fixed denominator m
    single_device: bool  # the client axis lives on one device (SecAgg's mask layout)
