"""Krum and multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017): the server keeps the updates closest to their neighbours.

With n participants of which at most f are Byzantine (`config.server.krum_byzantine`), each
participant i gets the score

  s(i) = sum of ||delta_i - delta_j||^2 over the n - f - 2 participants j != i nearest to i,

and

  krum        returns the update with the lowest score;
  multi_krum  averages (uniformly) the m' updates with the lowest scores, m' =
              `config.server.multi_krum_m`, 0 meaning n - f (every update but f). m' = 1 is Krum.

Krum is (alpha, f)-Byzantine resilient when 2f + 2 < n; `validate.py` asks for a round cohort of
at least 2f + 3. Like the coordinate-wise aggregators (robust.py), a weight only says who takes
part, and a participant whose update is not finite is faulty: it is left out before scoring and
does not count in n (`train/excluded_updates`). If that leaves fewer than 2f + 3 updates, the
score still sums over at least the one nearest neighbour (over none when a single update is
left); when none is left the update is zero. Ties go to the hospital in the lower slot.

Everything is masked, not sliced: the pairwise distances are a [K, K] matrix over the whole client
axis with the absent pairs at +inf, the neighbour count n - f - 2 and m' are traced, so the
participant count may change from round to round in one compiled round. The distances are
computed one row at a time (`lax.map`, K x D memory, exact differences rather than a Gram
matrix), O(K^2 D) work. The aggregate needs every update in the clear, so it is refused with
secure aggregation or client-level DP, like the median.

`combine` also returns `krum/selected` [K] (1 for the updates averaged), which the training
loop logs as `train/krum_selected` (the hospitals chosen).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_med.aggregation import robust
from fedjax_med.aggregation.base import Combined, PyTree, StrategyArgs
from fedjax_med.state import RoundInputs


def pairwise_sq_distances(stacked: PyTree) -> jax.Array:
    """float32 [K, K]: ||x_i - x_j||^2 over every leaf of the stacked updates."""
    leaves = jax.tree.leaves(stacked)
    k = leaves[0].shape[0]

    def row(i):
        return sum(jnp.sum((x - x[i]) ** 2, axis=tuple(range(1, x.ndim))) for x in leaves)

    return jax.lax.map(row, jnp.arange(k)).astype(jnp.float32)


def krum_scores(stacked: PyTree, valid: jax.Array, byzantine: int) -> jax.Array:
    """float32 [K]: each valid participant's Krum score (+inf for the others)."""
    k = valid.shape[0]
    n = jnp.sum(valid, dtype=jnp.int32)
    # n - f - 2 neighbours, at least 1 (none with a single update), at most the n - 1 others.
    neighbours = jnp.minimum(jnp.maximum(n - byzantine - 2, 1), jnp.maximum(n - 1, 0))
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(k, dtype=bool)
    ordered = jnp.sort(jnp.where(pair, pairwise_sq_distances(stacked), jnp.inf), axis=1)
    nearest = jnp.arange(k)[None, :] < neighbours
    scores = jnp.sum(jnp.where(nearest, ordered, 0.0), axis=1)
    return jnp.where(valid, scores, jnp.inf)


def krum_selection(
    stacked: PyTree, weights: jax.Array, byzantine: int, num_selected: int
) -> jax.Array:
    """Bool [K]: the updates multi-Krum averages, the `num_selected` valid ones with the lowest
    scores (0: n - f; never more than the n valid ones, at least one when there is one)."""
    valid = robust.valid_participants(stacked, weights)
    n = jnp.sum(valid, dtype=jnp.int32)
    scores = krum_scores(stacked, valid, byzantine)
    wanted = n - byzantine if num_selected == 0 else jnp.int32(num_selected)
    count = jnp.clip(wanted, jnp.minimum(n, 1), n)
    # Valid ones first, then by score; stable, so a tie goes to the lower slot.
    order = jnp.lexsort((scores, ~valid))
    rank = jnp.zeros(valid.shape[0], jnp.int32).at[order].set(jnp.arange(valid.shape[0]))
    return valid & (rank < count)


def selected_mean(stacked: PyTree, selected: jax.Array) -> PyTree:
    """The uniform mean of the selected rows; the others (possibly NaN) add exactly 0."""
    count = jnp.maximum(jnp.sum(selected, dtype=jnp.float32), 1.0)

    def mean(x):
        keep = selected.reshape((-1,) + (1,) * (x.ndim - 1))
        return (jnp.sum(jnp.where(keep, x, 0), axis=0) / count).astype(x.dtype)

    return jax.tree.map(mean, stacked)


def multi_krum(stacked: PyTree, weights: jax.Array, byzantine: int, num_selected: int) -> PyTree:
    """Multi-Krum's aggregate (`num_selected` = 1: Krum's)."""
    return selected_mean(stacked, krum_selection(stacked, weights, byzantine, num_selected))


@dataclasses.dataclass(frozen=True)
class Krum:
    byzantine: int  # f: server.krum_byzantine
    num_selected: int  # m': 1 for Krum, server.multi_krum_m for multi-Krum (0 = n - f)

    def combine(
        self, deltas: PyTree, inputs: RoundInputs, key: jax.Array, clip_norm: jax.Array
    ) -> Combined:
        del key  # deterministic
        selected = krum_selection(deltas, inputs.weights, self.byzantine, self.num_selected)
        metrics = {
            'train/excluded_updates': robust.excluded_count(deltas, inputs.weights),
            'krum/selected': selected.astype(jnp.float32),
        }
        return Combined(selected_mean(deltas, selected), clip_norm, metrics)


def build_krum(args: StrategyArgs) -> Krum:
    return Krum(byzantine=int(args.config.server.krum_byzantine), num_selected=1)


def build_multi_krum(args: StrategyArgs) -> Krum:
    server = args.config.server
    return Krum(byzantine=int(server.krum_byzantine), num_selected=int(server.multi_krum_m))
