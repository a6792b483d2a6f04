"""Client batching on the host: which examples each hospital uses in each local step.

Training data stays on the device (one padded array per hospital, client axis sharded); a round
only needs small index arrays `[K, S, B]`, an example mask `[K, S, B]` and the active steps
`[K, S]`, which the round gathers from on the device. Two samplers:

- `shuffle`: `epochs` passes over each hospital's data without replacement, batches of B; the last
  batch of a hospital may be partial (masked).
- `poisson`: every step keeps each example independently with probability q_k = B / n_k (the
  sampling DP-SGD's accounting assumes); the kept examples fill a fixed-size batch of `max_batch`
  slots and the mask marks them. A step that samples more than `max_batch` examples drops the
  excess, which the accounting does not cover, so `poisson_max_batch` makes it rare and any
  overflow is counted and reported (`ClientBatches.overflow`, the `privacy/poisson_overflow`
  metric), never hidden.

Guarantee of `max_batch`: hospital k's count per step is Binomial(n_k, q_k), with variance
B (1 - B / n_k), which grows with n_k, so the largest hospitals overflow most easily.
`poisson_max_batch(B, sizes, tail)` is the smallest M with P(Binomial(n_k, q_k) > M) <= `tail`
for EVERY hospital k (exact binomial tails, the max over hospitals of each one's quantile); without
the sizes it uses the Poisson(B) quantile, which bounds every hospital's tail whatever its size
(Anderson and Samuels 1967). Over a run, hospital k overflows at all with probability at most
p_k = tail * steps_k * num_rounds (union bound; `run_overflow_probability`). The run's output is
then within total variation p_k of the untruncated mechanism the accountant analyses, so where
the accountant reports (epsilon, delta_k) the run as executed is
(epsilon, delta_k + (1 + e^epsilon) p_k)-DP for hospital k's examples. With the default tail of
1e-9 per step, p_k = 1e-9 * steps_k * num_rounds; e.g. 97 steps x 20 rounds gives 2e-6, which is
NOT negligible next to delta = 1e-4. `run_overflow_tail` gives the per-step tail that keeps every
p_k at most 1e-3 delta_k / (1 + e^epsilon), so the extra delta is at most 1e-3 delta_k.

Every draw comes from numpy Generators seeded by (seed, round, hospital), so a resumed run draws
exactly what an uninterrupted one would.
"""

import dataclasses
import math

import numpy as np
from scipy import special, stats


@dataclasses.dataclass(frozen=True)
class ClientBatches:
    indices: np.ndarray  # int32 [K, S, B]
    mask: np.ndarray  # float32 [K, S, B]
    step_active: np.ndarray  # bool [K, S]
    overflow: int = 0  # Poisson draws larger than max_batch (examples dropped)


def steps_per_round(num_examples: int, batch_size: int, epochs: float) -> int:
    """Local steps of a hospital with `num_examples` examples (both samplers use this)."""
    return max(1, math.ceil(epochs * num_examples / batch_size))


POISSON_TAIL = 1e-9  # default per-step overflow probability bound of every hospital


def _smallest_within_tail(sf, lo: int, hi: int, tail: float) -> int:
    """Smallest integer m in [lo, hi] with sf(m) <= tail, for a non-increasing sf with
    sf(hi) <= tail (bisection on exact tail probabilities)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if sf(mid) <= tail:
            hi = mid
        else:
            lo = mid + 1
    return lo


def overflow_probability(batch_size: int, num_examples: int, max_batch: int) -> float:
    """P(Binomial(n, q) > max_batch) with q = min(1, B / n): one step of one hospital."""
    if num_examples <= 0:
        return 0.0
    q = min(1.0, batch_size / num_examples)
    return float(stats.binom.sf(max_batch, num_examples, q))


def poisson_max_batch(batch_size: int, sizes=None, tail: float = POISSON_TAIL) -> int:
    """Slots for a Poisson batch of expected size B: every hospital overflows with probability
    at most `tail` per step.

    With `sizes` (the hospitals' example counts) it is the max over hospitals of each one's exact
    Binomial(n_k, min(1, B / n_k)) quantile: the smallest M with P(count_k > M) <= `tail` for all
    k, also with n_k + 1 in place of n_k (a neighbouring dataset). The largest hospital usually
    needs the most slots (the variance B (1 - B / n) grows with n). Without sizes, or with a
    single number (which says nothing about the larger hospitals), it is the Poisson(B)
    quantile, an upper bound of all of them: for M >= B,
    P(Binomial(n, B / n) > M) <= P(Poisson(B) > M) for every n (Anderson and Samuels 1967).
    """
    if not 0 < tail < 1:
        raise ValueError(f'tail must be in (0, 1), got {tail}.')
    if sizes is None or np.ndim(sizes) == 0:
        # Poisson(B) upper tail; the bound above holds for M >= B (max() keeps M there).
        sf = lambda m: special.pdtrc(m, batch_size)
        hi = 2 * batch_size + 1
        while sf(hi) > tail:
            hi *= 2
        return max(batch_size + 1, _smallest_within_tail(sf, 0, hi, tail))
    slots = 1
    # n + 1 too: a neighbouring dataset with one more patient at hospital k must be covered.
    for n in {int(n) + e for n in np.asarray(sizes).ravel() if n > 0 for e in (0, 1)}:
        sf = lambda m, n=n: stats.binom.sf(m, n, min(1.0, batch_size / n))
        slots = max(slots, _smallest_within_tail(sf, 0, n, tail))  # sf(n) = 0
    return slots


def run_overflow_probability(
    batch_size: int, sizes, max_batch: int, steps, num_rounds: int
) -> np.ndarray:
    """Per hospital, a bound on P(any overflow in the run): steps_k * rounds * P(step overflow)."""
    return np.array(
        [
            int(s) * num_rounds * overflow_probability(batch_size, int(n), max_batch)
            for n, s in zip(sizes, steps, strict=True)
        ]
    )


def run_overflow_tail(
    steps, num_rounds: int, deltas, epsilon: float | None = None, fraction: float = 1e-3
) -> float:
    """Per-step tail that keeps every hospital's whole-run overflow negligible next to its delta.

    Hospital k overflows at all with probability at most tail * steps_k * num_rounds, which adds
    at most (1 + e^epsilon) times that to its delta (see the module docstring). The returned tail
    (never above `POISSON_TAIL`) keeps that addition at most `fraction` * delta_k; without
    `epsilon` the (1 + e^epsilon) factor is left out and the whole-run overflow probability
    itself is at most `fraction` * delta_k.
    """
    factor = 1.0 if epsilon is None else 1.0 + math.exp(epsilon)
    deltas = np.broadcast_to(np.asarray(deltas, np.float64), np.shape(steps))
    tail = POISSON_TAIL
    for s, d in zip(np.asarray(steps).ravel(), deltas.ravel(), strict=True):
        if s > 0:
            tail = min(tail, fraction * float(d) / (factor * int(s) * num_rounds))
    return tail


def shuffle_batches(
    sizes, batch_size: int, epochs: float, num_steps: int, rng_for_client
) -> ClientBatches:
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


def poisson_batches(
    sizes, batch_size: int, epochs: float, num_steps: int, max_batch: int, rng_for_client
) -> ClientBatches:
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
