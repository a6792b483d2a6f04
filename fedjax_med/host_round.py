"""The host half of a round: everything decided in numpy before the jitted round runs.

`RoundPlanner.prepare(r)` draws which hospitals take part (m of K, `sample_participants`), checks
the privacy budget, builds the local steps' index arrays and masks (shuffle or Poisson,
data/batching.py), the aggregation weights and, with secure aggregation, runs the host protocol
(key agreement, Shamir shares, dropouts); the result goes to the devices as one `RoundInputs`.
Every draw comes from `np.random.default_rng([seed, round, PURPOSE, ...])` (purposes in
`streams.py`), so a resumed run prepares exactly the rounds an uninterrupted one would.

The training loop calls `prepare(r + 1)` while the device runs round r (dispatch is
asynchronous), so none of this sits between two rounds on the device.

**The round's client axis holds the participants.** With m of K hospitals a round
(`config.clients_per_round`), `RoundInputs` has M_pad slots (m padded to the device count), not
K_pad rows: slot j is hospital `client_ids[j]` (participants in increasing order, then padding
slots whose id is K_pad, out of range: no data, weight 0, no active step). The round gathers
the participants' data and per-hospital state by these ids and scatters the state back
(`rounds.py`), so a round costs what its participants compute and compiles once whatever the
draw. Each slot's index arrays, weights, sigma_k and random keys are those of its hospital, so
the result is today's masked round over all K up to the order of floating-point sums. When every
hospital takes part the slots are the K_pad rows, in order.
"""

from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_med import attacks, parallel, streams
from fedjax_med.aggregation import secagg_host
from fedjax_med.data import batching
from fedjax_med.state import RoundInputs


def lr_schedule(lc: ml_collections.ConfigDict, num_rounds: int):
    """The client learning rate of each round: config.local.schedule over `num_rounds`."""
    if lc.schedule == 'constant':
        return lambda r: lc.learning_rate
    if lc.schedule == 'cosine':
        return optax.cosine_decay_schedule(lc.learning_rate, max(num_rounds, 1), alpha=0.1)
    return lambda r: lc.learning_rate * lc.decay_rate**r


def sample_participants(config, round_index: int, num_clients: int) -> np.ndarray:
    """Bool [K]: which hospitals take part this round (m of K, uniformly without replacement)."""
    m = config.clients_per_round
    if config.mode != 'federated' or m == 0 or m >= num_clients:
        return np.ones(num_clients, bool)
    rng = np.random.default_rng([config.seed, round_index, streams.HOST_PARTICIPANTS])
    chosen = np.zeros(num_clients, bool)
    chosen[rng.choice(num_clients, m, replace=False)] = True
    return chosen


class PreparedRound(NamedTuple):
    """A round's inputs on the device and the host facts the loop logs about it."""

    inputs: RoundInputs
    round_steps: np.ndarray  # local steps each (padded) hospital runs
    num_participants: int
    num_senders: int  # participants that send their update (SecAgg dropouts do not)
    poisson_overflow: int  # Poisson draws cut to the maximum batch (logged when > 0)
    protocol_up: int  # SecAgg protocol bytes per hospital, up / down
    protocol_down: int
    participants: list[int] | None = None  # the hospitals taking part, when not all of them


class RoundPlanner:
    """Prepares each round's `RoundInputs` for the hospitals of one run.

    Args:
      config: the run's config.
      sizes: training examples of each hospital, padded to the mesh with zeros ([K_pad]).
      steps: local steps of each hospital per round ([K_pad]; 0 for padding).
      num_clients: K, the real hospitals (the rest of the client axis is padding).
      privacy: the run's privacy plan (budget check, sigma_k, the Poisson batch size).
      weights: the aggregator's host-side weight rule, (num_examples [K], participating [K])
        -> weights [K] (`aggregation.registry.AggregatorSpec.weights`).
      mesh: where the inputs go.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        sizes: np.ndarray,
        steps: np.ndarray,
        num_clients: int,
        privacy,
        weights,
        mesh,
    ):
        self.config, self.privacy, self.weights, self.mesh = config, privacy, weights, mesh
        self.sizes, self.steps, self.num_clients = sizes, steps, num_clients
        self.k_pad = len(sizes)
        self.num_steps = int(steps.max())
        schedule = lr_schedule(config.local, config.num_rounds)
        # Every round's client learning rate, computed once (not a device call per round).
        self.lr_by_round = np.array([schedule(r) for r in range(config.num_rounds)], np.float32)
        batch = config.local.batch_size
        self.expected_batch = np.where(
            sizes > 0, np.minimum(batch, np.maximum(sizes, 1)), 1
        ).astype(np.float32)
        self.noise_multiplier = np.zeros(self.k_pad, np.float32)  # padding never trains
        self.noise_multiplier[:num_clients] = privacy.noise_multipliers
        self.num_slots = num_slots(config, num_clients, mesh)
        # The attack simulation's malicious hospitals ([K_pad], 1 = malicious), or None.
        self.malicious = attacks.malicious_hospitals(config, self.k_pad)

    def slot_ids(self, participating: np.ndarray) -> np.ndarray:
        """int32 [M_pad]: the hospital of each slot of the round's client axis (K_pad: none)."""
        if self.num_slots == self.k_pad:
            return np.arange(self.k_pad, dtype=np.int32)
        ids = np.full(self.num_slots, self.k_pad, np.int32)
        chosen = np.flatnonzero(participating)
        ids[: len(chosen)] = chosen
        return ids

    def prepare(self, r: int) -> PreparedRound | str:
        """Round r's inputs, sent to the devices; a message instead if the privacy budget would
        be exceeded by running it."""
        config, k_pad, num_clients = self.config, self.k_pad, self.num_clients
        participating = np.zeros(k_pad, bool)
        participating[:num_clients] = sample_participants(config, r, num_clients)
        round_steps = np.where(participating, self.steps, 0)
        stop_reason = self.privacy.check_budget(round_steps[:num_clients])
        if stop_reason:
            return stop_reason
        ids = self.slot_ids(participating)
        # Per hospital [K_pad] -> per slot [M_pad]; a padding slot gets `fill`.
        take = lambda x, fill=0: np.concatenate([x, np.full(1, fill, x.dtype)])[ids]
        batches = self._batches(r, take(np.where(participating, self.sizes, 0)), ids)
        weights = take(
            self.weights(self.sizes.astype(np.float32), participating.astype(np.float32))
        )
        secagg_inputs, protocol_up, protocol_down = (), 0, 0
        num_participants = int(participating[:num_clients].sum())
        num_senders = num_participants
        if config.secagg.enabled:
            secagg_inputs, protocol_up, protocol_down = secagg_host.secagg_round(
                config, r, participating, num_clients
            )
            num_senders = int(np.sum(secagg_inputs.survivor))
            secagg_inputs = _secagg_slots(secagg_inputs, ids)
        inputs = RoundInputs(
            indices=batches.indices,
            mask=batches.mask,
            step_active=batches.step_active,
            weights=weights,
            expected_batch=take(self.expected_batch, 1.0),
            noise_multiplier=take(self.noise_multiplier),
            client_ids=ids,
            learning_rate=self.lr_by_round[r],
            secagg=secagg_inputs,
            malicious=() if self.malicious is None else take(self.malicious),
        )
        inputs = jax.device_put(inputs, parallel.round_inputs_sharding(self.mesh, inputs))
        everyone = num_participants == num_clients
        return PreparedRound(
            inputs,
            round_steps,
            num_participants,
            num_senders,
            batches.overflow,
            protocol_up,
            protocol_down,
            None if everyone else np.flatnonzero(participating).tolist(),
        )

    def hospital_round(self, r: int, hospital_id: int) -> PreparedRound | str:
        """Round r of one deployed hospital (fedjax_med/deploy), the server having chosen it: this
        planner's only row is hospital `hospital_id` of the federation. Its batches and device keys
        are drawn by that id, so they are the ones the simulation draws for it. A message instead
        if the hospital's own privacy budget (this planner's `privacy`) would be exceeded."""
        round_steps = self.steps.copy()
        stop_reason = self.privacy.check_budget(round_steps[: self.num_clients])
        if stop_reason:
            return stop_reason
        ids = np.full(self.k_pad, hospital_id, np.int32)
        batches = self._batches(r, self.sizes, ids)
        inputs = RoundInputs(
            indices=batches.indices,
            mask=batches.mask,
            step_active=batches.step_active,
            weights=np.ones(self.k_pad, np.float32),
            expected_batch=self.expected_batch,
            noise_multiplier=self.noise_multiplier,
            client_ids=ids,
            learning_rate=self.lr_by_round[r],
            secagg=(),
        )
        inputs = jax.device_put(inputs, parallel.round_inputs_sharding(self.mesh, inputs))
        return PreparedRound(inputs, round_steps, 1, 1, batches.overflow, 0, 0)

    def _batches(
        self, r: int, sampler_sizes: np.ndarray, ids: np.ndarray
    ) -> batching.ClientBatches:
        """Index arrays of each slot, drawn from the stream of the slot's hospital."""
        lc, seed = self.config.local, self.config.seed
        rng_for = lambda j: np.random.default_rng([seed, r, streams.HOST_BATCHES, int(ids[j])])
        if lc.sampling == 'poisson':
            return batching.poisson_batches(
                sampler_sizes,
                lc.batch_size,
                lc.epochs,
                self.num_steps,
                self.privacy.max_batch,
                rng_for,
            )
        return batching.shuffle_batches(
            sampler_sizes, lc.batch_size, lc.epochs, self.num_steps, rng_for
        )


def num_slots(config: ml_collections.ConfigDict, num_clients: int, mesh) -> int:
    """M_pad, the length of the round's client axis: the m hospitals of a round, padded to the
    device count, or all K_pad when every hospital takes part."""
    m = config.clients_per_round
    k_pad = parallel.padded_num_clients(num_clients, mesh)
    if config.mode != 'federated' or m == 0 or m >= num_clients:
        return k_pad
    return min(parallel.padded_num_clients(m, mesh), k_pad)


def _secagg_slots(inputs, ids: np.ndarray):
    """The host protocol's per-hospital arrays ([K_pad] and [K_pad, K_pad]) on the round's
    slots; a padding slot (id K_pad) has no keys, signs or survival."""
    k_pad = np.shape(inputs.survivor)[0]
    if len(ids) == k_pad and np.array_equal(ids, np.arange(k_pad)):
        return inputs

    def rows(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((1, *x.shape[1:]), x.dtype)])[ids]

    def pairs(x):
        x = np.asarray(x)
        padded = np.zeros((k_pad + 1, k_pad + 1, *x.shape[2:]), x.dtype)
        padded[:k_pad, :k_pad] = x
        return padded[np.ix_(ids, ids)]

    return inputs._replace(
        pair_keys=pairs(inputs.pair_keys),
        pair_signs=pairs(inputs.pair_signs),
        self_keys=rows(inputs.self_keys),
        survivor=rows(inputs.survivor),
        recovered_self_keys=rows(inputs.recovered_self_keys),
        recovered_pair_keys=pairs(inputs.recovered_pair_keys),
    )
