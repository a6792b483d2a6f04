"""Pytree dataclasses that cross the jit boundary: the server state, one round's inputs, and one
hospital's share of them."""

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class ServerState:
    """Everything the jitted round reads and writes between rounds (checkpointed as one pytree).

    In 'local' mode `params` carries a leading client axis: every hospital keeps its own model.
    """

    params: Any
    opt_state: Any  # server optimiser state (optax)
    round: jax.Array  # int32 scalar: rounds completed
    clip_norm: jax.Array  # float32 scalar: client-level DP clip (adapted when adaptive)
    client_state: Any  # per-hospital state with leading axis K (e.g. error feedback), or ()


@flax.struct.dataclass
class ClientInputs:
    """One hospital's share of a round (one slot of `RoundInputs`), as `client.local_update`
    reads it; mapped over the client axis as one pytree."""

    indices: jax.Array  # int32 [S, B]
    mask: jax.Array  # float32 [S, B]
    step_active: jax.Array  # bool [S]
    expected_batch: jax.Array  # float32 scalar: the DP-SGD denominator
    noise_multiplier: jax.Array  # float32 scalar: this hospital's DP-SGD sigma
    key: jax.Array  # this hospital's key of the round; step keys fold in the step
    malicious: Any = ()  # float32 scalar, 1 = this hospital attacks (attacks.py), or () with none


@flax.struct.dataclass
class RoundInputs:
    """Host-built arrays for one round. Leading axis M: the round's slots, the m participating
    hospitals padded to the device count, or all K_pad hospitals when every one takes part
    (host_round.py)."""

    indices: jax.Array  # int32 [M, S, B]: example index into the hospital's training data
    mask: jax.Array  # float32 [M, S, B]: 1 = example used in this step, 0 = padding
    step_active: jax.Array  # bool [M, S]: the step runs (an empty Poisson batch still runs)
    weights: jax.Array  # float32 [M]: aggregation weight, 0 for hospitals not taking part
    expected_batch: jax.Array  # float32 [M]: DP-SGD denominator q_k * n_k (or the batch size)
    noise_multiplier: jax.Array  # float32 [M]: DP-SGD sigma_k of each hospital (0 without DP-SGD)
    client_ids: jax.Array  # int32 [M]: each slot's hospital (K_pad: padding), its data and keys
    learning_rate: jax.Array  # float32 scalar: this round's client learning rate
    secagg: Any = ()  # secure-aggregation arrays from the host protocol, or ()
    malicious: Any = ()  # float32 [M]: 1 = the slot's hospital attacks (attacks.py), or ()

    def per_client(self, keys: jax.Array) -> ClientInputs:
        """The per-hospital fields, with each slot's key: leading axis M, like `keys`."""
        return ClientInputs(
            indices=self.indices,
            mask=self.mask,
            step_active=self.step_active,
            expected_batch=self.expected_batch,
            noise_multiplier=self.noise_multiplier,
            key=keys,
            malicious=self.malicious,
        )
