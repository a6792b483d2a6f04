"""Client batching on the host: which examples each hospital uses in each local step.

Training data stays on the device (one padded array per hospital, client axis sharded); a round
only needs small index arrays `[K, S, B]`, an example mask `[K, S, B]` and the active steps
`[K, S]`, which the round gathers from on the device. Two samplers:

- `shuffle`: `epochs` passes over each hospital's data without replacement, batches of B; the last
  batch of a hospital may be partial (masked).
- `poisson`: every step keeps each example independently with probability q_k = B / n_k (the
  sampling DP-SGD's accounting assumes); the kept examples fill a fixed-size batch of `max_batch`
  slots and the mask marks them. A step that samples more than `max_batch` examples would have
  to drop some, which the accounting does not cover: `max_batch` is set so this has probability
  below 1e-9 per step, and any overflow is counted and reported, never hidden.

Every draw comes from numpy Generators seeded by (seed, round, hospital), so a resumed run draws
exactly what an uninterrupted one would.
"""

import dataclasses
import math

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class ClientBatches:
    indices: np.ndarray      # int32 [K, S, B]
    mask: np.ndarray         # float32 [K, S, B]
    step_active: np.ndarray  # bool [K, S]
    overflow: int = 0        # Poisson draws larger than max_batch (examples dropped)


def steps_per_round(num_examples: int, batch_size: int, epochs: float) -> int:
    """Local steps of a hospital with `num_examples` examples (both samplers use this)."""
    return max(1, math.ceil(epochs * num_examples / batch_size))


def poisson_max_batch(batch_size: int, min_size: int, tail: float = 1e-9) -> int:
    """Slots for a Poisson batch of expected size `batch_size`: binomial tail below `tail`.

    The worst case is the smallest hospital (largest q = B / n_min).
    """
    n = max(min_size, batch_size)
    return int(stats.binom.isf(tail, n, batch_size / n)) + 1


def shuffle_batches(sizes, batch_size: int, epochs: float, num_steps: int,
                    rng_for_client) -> ClientBatches:
    """Epochs without replacement. `rng_for_client(k)` returns hospital k's Generator."""
    k_total = len(sizes)
    idx = np.zeros((k_total, num_steps, batch_size), np.int32)
    mask = np.zeros((k_total, num_steps, batch_size), np.float32)
    active = np.zeros((k_total, num_steps), bool)
    for k, n in enumerate(sizes):
        if n == 0:
            continue
        rng = rng_for_client(k)
        total = int(round(epochs * n))
        order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(total / n))])[:total]
        steps = steps_per_round(n, batch_size, epochs)
        flat_idx = np.zeros(steps * batch_size, np.int32)
        flat_idx[:total] = order
        flat_mask = np.zeros(steps * batch_size, np.float32)
        flat_mask[:total] = 1.0
        idx[k, :steps] = flat_idx.reshape(steps, batch_size)
        mask[k, :steps] = flat_mask.reshape(steps, batch_size)
        active[k, :steps] = True
    return ClientBatches(idx, mask, active)


def poisson_batches(sizes, batch_size: int, epochs: float, num_steps: int, max_batch: int,
                    rng_for_client) -> ClientBatches:
    """Poisson sampling with q_k = batch_size / n_k for ceil(epochs / q_k) steps per hospital."""
    k_total = len(sizes)
    idx = np.zeros((k_total, num_steps, max_batch), np.int32)
    mask = np.zeros((k_total, num_steps, max_batch), np.float32)
    active = np.zeros((k_total, num_steps), bool)
    overflow = 0
    for k, n in enumerate(sizes):
        if n == 0:
            continue
        rng = rng_for_client(k)
        q = min(1.0, batch_size / n)
        steps = steps_per_round(n, batch_size, epochs)
        # Poisson subsampling = a Binomial(n, q) count, then a uniform subset of that size.
        counts = rng.binomial(n, q, size=steps)
        for s, c in enumerate(counts):
            chosen = rng.choice(n, size=c, replace=False)
            if c > max_batch:
                overflow += int(c - max_batch)
                chosen = chosen[:max_batch]
            idx[k, s, : len(chosen)] = chosen
            mask[k, s, : len(chosen)] = 1.0
        active[k, :steps] = True
    return ClientBatches(idx, mask, active, overflow)
