"""The host half of a round: everything decided in numpy before the jitted round runs.

`RoundPlanner.prepare(r)` draws which hospitals take part (m of K, `sample_participants`), checks
the privacy budget, builds the local steps' index arrays and masks (shuffle or Poisson,
data/batching.py), the aggregation weights and, with secure aggregation, runs the host protocol
(key agreement, Shamir shares, dropouts); the result goes to the devices as one `RoundInputs`.
Every draw comes from `np.random.default_rng([seed, round, PURPOSE, ...])` (purposes in
`streams.py`), so a resumed run prepares exactly the rounds an uninterrupted one would.

The training loop calls `prepare(r + 1)` while the device runs round r (dispatch is
asynchronous), so none of this sits between two rounds on the device.
"""

from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fedjax_med import parallel, streams
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
    round_steps: np.ndarray    # local steps each (padded) hospital runs
    num_participants: int
    num_senders: int           # participants that send their update (SecAgg dropouts do not)
    poisson_overflow: int      # Poisson draws cut to the maximum batch (logged when > 0)
    protocol_up: int           # SecAgg protocol bytes per hospital, up / down
    protocol_down: int


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

    def __init__(self, config: ml_collections.ConfigDict, *, sizes: np.ndarray,
                 steps: np.ndarray, num_clients: int, privacy, weights, mesh):
        self.config, self.privacy, self.weights, self.mesh = config, privacy, weights, mesh
        self.sizes, self.steps, self.num_clients = sizes, steps, num_clients
        self.k_pad = len(sizes)
        self.num_steps = int(steps.max())
        schedule = lr_schedule(config.local, config.num_rounds)
        # Every round's client learning rate, computed once (not a device call per round).
        self.lr_by_round = np.array([schedule(r) for r in range(config.num_rounds)], np.float32)
        batch = config.local.batch_size
        self.expected_batch = np.where(sizes > 0, np.minimum(batch, np.maximum(sizes, 1)),
                                       1).astype(np.float32)
        self.noise_multiplier = np.zeros(self.k_pad, np.float32)  # padding never trains
        self.noise_multiplier[:num_clients] = privacy.noise_multipliers

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
        batches = self._batches(r, np.where(participating, self.sizes, 0))
        weights = self.weights(self.sizes.astype(np.float32), participating.astype(np.float32))
        secagg_inputs, protocol_up, protocol_down = (), 0, 0
        num_participants = int(participating[:num_clients].sum())
        num_senders = num_participants
        if config.secagg.enabled:
            secagg_inputs, protocol_up, protocol_down = secagg_host.secagg_round(
                config, r, participating, num_clients)
            num_senders = int(np.sum(secagg_inputs.survivor))
        inputs = RoundInputs(
            indices=batches.indices, mask=batches.mask, step_active=batches.step_active,
            weights=weights, expected_batch=self.expected_batch,
            noise_multiplier=self.noise_multiplier,
            client_ids=np.arange(k_pad, dtype=np.int32),
            learning_rate=self.lr_by_round[r], secagg=secagg_inputs)
        inputs = jax.device_put(inputs, parallel.round_inputs_sharding(self.mesh, inputs))
        return PreparedRound(inputs, round_steps, num_participants, num_senders,
                             batches.overflow, protocol_up, protocol_down)

    def _batches(self, r: int, sampler_sizes: np.ndarray) -> batching.ClientBatches:
        lc, seed = self.config.local, self.config.seed
        rng_for = lambda k: np.random.default_rng([seed, r, streams.HOST_BATCHES, k])
        if lc.sampling == 'poisson':
            return batching.poisson_batches(sampler_sizes, lc.batch_size, lc.epochs,
                                            self.num_steps, self.privacy.max_batch, rng_for)
        return batching.shuffle_batches(sampler_sizes, lc.batch_size, lc.epochs,
                                        self.num_steps, rng_for)
