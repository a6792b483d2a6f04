"""Secure aggregation (SecAgg / SecAgg+), device side: encoding, masking, masked sum, unmasking.

The host half (`secagg_protocol.py`) runs key agreement and Shamir secret sharing once per round
and hands this module plain arrays (`SecAggInputs`). Everything here is jittable and works on the
stacked client axis K, so it lives inside the one jitted round.

Pipeline for one round (Bonawitz et al. 2017; Bell et al. 2020 for the sparse "+" graph):

1. `encode`: clip each coordinate to [-c, c], scale by Q, round stochastically (unbiased) to an
   integer, and store it in the ring Z_{2^32} (two's complement in uint32).
2. `mask_updates`: client u adds  sum_v sign[u, v] * PRG(s_uv) + PRG(b_u)  (mod 2^32), where
   s_uv = s_vu is the pairwise seed agreed with neighbour v and b_u is u's private self seed.
   The pairwise terms cancel in the sum over all clients (sign[u, v] = -sign[v, u]).
3. `masked_sum`: the server adds the masked inputs it received (uint32 wrap-around).
4. `unmask`: the server subtracts PRG(b_u) for every survivor u (b_u rebuilt from Shamir shares)
   and the pairwise terms that survivors share with dropped neighbours (s_uv rebuilt from the
   dropped client's shared mask key). The result is exactly the modular sum of the survivors'
   encoded updates.
5. `decode`: read the sum as int32 and divide by Q.

Headroom: `scale_for` picks Q so that K * (c*Q + 1) < 2^31, hence the sum of K encoded values,
each in [-(cQ+1), cQ+1], never leaves the int32 range and the wrap-around of Z_{2^32} is only
ever used by the masks, not by the data.

PRG and what it means for security here: masks (and the rounding coins of `encode`) are expanded
with Threefry-2x32-20 (Salmon et al. 2011, the counter-based PRF behind `jax.random`) in counter
mode, keyed with 64 bits (two uint32 words) taken from the HKDF-SHA256 output of the host
protocol, one stream per pytree leaf (`secure_sum` flattens each update to one leaf first, so a
mask is one stream over the whole update). The cipher is written out here (`threefry2x32`,
checked against the Random123 known-answer vectors) so that XLA fuses its 20 rounds into one
pass over the mask: `jax.random`'s CPU lowering runs them as a loop over whole arrays, about 5x
slower (BENCHMARKS.md), and masks dominate the cost of a SecAgg round. Threefry passes statistical
tests (BigCrush) and is adequate for a simulation that measures accuracy, bytes and dropout
behaviour, but it is not a standardised cryptographic PRG and a 64-bit seed is brute-forceable in
principle. A deployment would expand 128+-bit seeds with AES-CTR or ChaCha20 on each client. The
server in this simulation also holds every client's keys (one process plays all parties); the
protocol's guarantees are exercised (shares, thresholds, dropouts), not enforced.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Encoded magnitudes are capped at 2^20 levels: float32 has a 24-bit significand, so x*Q is then
# accurate to 1/16 of a level and the stochastic rounding stays unbiased up to float32 precision.
_MAX_LEVELS = 2**20
_INT32_HEADROOM = 2**31


class SecAggConfig(NamedTuple):
    """Static configuration of secure aggregation.

    Attributes:
      clip: per-coordinate clip c; encoded values lie in [-c, c] before scaling.
      num_clients: K, the size of the client axis (sets the headroom of the fixed-point scale).
      bits: size of the ring Z_{2^bits}; only 32 is implemented.
    """

    clip: float
    num_clients: int
    bits: int = 32

    @property
    def scale(self) -> float:
        if self.bits != 32:
            raise ValueError(f'SecAggConfig.bits={self.bits}: only the ring Z_2^32 is implemented.')
        return scale_for(self.clip, self.num_clients)


class SecAggInputs(NamedTuple):
    """Per-round arrays produced by the host protocol (`secagg_protocol.run_protocol`).

    Attributes:
      pair_keys: uint32[K, K, 2] PRG seeds of the pairwise masks, symmetric in (u, v).
      pair_signs: int32[K, K], +1 if u < v, -1 if u > v, 0 on the diagonal, for non-neighbours and
        for clients that take no part in this round.
      self_keys: uint32[K, 2] PRG seed of each client's self mask b_u.
      survivor: float32[K], 1 for clients that sent their masked input this round.
      recovered_self_keys: uint32[K, 2], self keys the server rebuilt from shares (survivors only;
        zeros elsewhere).
      recovered_pair_keys: uint32[K, K, 2], pairwise keys the server rebuilt for pairs (u, v) with
        u a survivor and v dropped (zeros elsewhere).
    """

    pair_keys: jax.Array
    pair_signs: jax.Array
    self_keys: jax.Array
    survivor: jax.Array
    recovered_self_keys: jax.Array
    recovered_pair_keys: jax.Array


# ---------------------------------------------------------------------------------------------
# Pseudo-random generator (masks and rounding coins)
# ---------------------------------------------------------------------------------------------


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def threefry2x32(key: jax.Array, c0: jax.Array, c1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds: the block (c0, c1) enciphered under key uint32[2].

    Elementwise over c0 and c1 (uint32 arrays of one shape); the rounds are unrolled so XLA fuses
    the whole cipher into one loop over the counters.
    """
    k0, k1 = key[0], key[1]
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_THREEFRY_PARITY))
    x0, x1 = c0 + ks[0], c1 + ks[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
            x1 = x1 ^ x0
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + jnp.uint32(group + 1)
    return x0, x1


def prg_bits(seed: jax.Array, num_words: int, *, stream: int = 0) -> jax.Array:
    """uint32[num_words] from Threefry-2x32 in counter mode: block i = (stream, i) gives words
    2i and 2i + 1. Distinct streams under one seed are independent."""
    num_blocks = (num_words + 1) // 2
    if num_blocks > 2**32:
        raise ValueError(f'prg_bits: {num_words} words exceed one stream (at most 2^33).')
    seed = jnp.asarray(seed, jnp.uint32)
    counter = jnp.arange(num_blocks, dtype=jnp.uint32)
    x0, x1 = threefry2x32(seed, jnp.full_like(counter, stream), counter)
    return jnp.stack([x0, x1], axis=1).reshape(-1)[:num_words]


def _seed_words(key: jax.Array) -> jax.Array:
    """The uint32[2] Threefry seed of a JAX key: its key data (the first two words for key
    types with more). Drawing the seed with `jax.random.bits` instead would let XLA:CPU fuse
    jax.random's cipher into the mask loop and redo it for every word (4x slower)."""
    return jax.random.key_data(key).reshape(-1)[:2].astype(jnp.uint32)


# ---------------------------------------------------------------------------------------------
# Fixed-point encoding
# ---------------------------------------------------------------------------------------------


def scale_for(clip: float, num_clients: int) -> float:
    """Fixed-point scale Q with K * (c*Q + 1) < 2^31.

    The sum of K encoded values, each in [-(cQ+1), cQ+1] (stochastic rounding may add one level),
    then fits in int32, so reading the Z_{2^32} sum back as two's complement is exact. Q is
    further capped at 2^20 / c levels to keep float32 scaling accurate (see `_MAX_LEVELS`).
    """
    if clip <= 0:
        raise ValueError(f'clip={clip}: the per-coordinate clip must be positive.')
    if num_clients < 1:
        raise ValueError(f'num_clients={num_clients}: need at least one client.')
    levels = min(_MAX_LEVELS, (_INT32_HEADROOM - 1) // num_clients - 1)
    if levels < 1:
        raise ValueError(f'num_clients={num_clients} leaves no int32 headroom for encoding.')
    # K * (levels + 1) <= K * ((2^31 - 1) // K) <= 2^31 - 1.
    return levels / clip


def _max_level(clip: float, scale: float) -> int:
    # The tiny epsilon absorbs float64 round-off in (levels / c) * c.
    return math.floor(clip * scale + 1e-6)


def encode(tree: PyTree, key: jax.Array, *, clip: float, scale: float) -> PyTree:
    """Clip, scale and stochastically round every leaf to Z_{2^32} (uint32, two's complement)."""
    leaves, treedef = jax.tree.flatten(tree)
    limit = float(_max_level(clip, scale))
    seed = _seed_words(key)

    def encode_leaf(i: int, x: jax.Array) -> jax.Array:
        y = jnp.clip(jnp.clip(x.astype(jnp.float32), -clip, clip) * scale, -limit, limit)
        floor = jnp.floor(y)
        # floor(y) + Bernoulli(y - floor(y)) has expectation y: unbiased rounding (up to the
        # 2^-24 resolution of the uniform coin).
        coin = (prg_bits(seed, x.size, stream=i) >> 8).astype(jnp.float32) * 2.0**-24
        up = coin.reshape(y.shape) < (y - floor)
        level = floor.astype(jnp.int32) + up.astype(jnp.int32)
        return jax.lax.bitcast_convert_type(level, jnp.uint32)

    return jax.tree.unflatten(treedef, [encode_leaf(i, x) for i, x in enumerate(leaves)])


def decode(sum_tree: PyTree, *, scale: float) -> PyTree:
    """Read a Z_{2^32} sum as int32 (two's complement) and undo the fixed-point scale."""
    return jax.tree.map(
        lambda s: jax.lax.bitcast_convert_type(s, jnp.int32).astype(jnp.float32) / scale, sum_tree
    )


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def expand_mask(seed_key: jax.Array, like_tree: PyTree) -> PyTree:
    """PRG(seed): uniform uint32 leaves shaped like `like_tree` from a uint32[2] seed (stream i
    for leaf i)."""
    leaves, treedef = jax.tree.flatten(like_tree)
    masks = [
        prg_bits(seed_key, math.prod(jnp.shape(x)), stream=i).reshape(jnp.shape(x))
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, masks)


def _add_u32(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _as_u32_weights(signs: jax.Array) -> jax.Array:
    """int {-1, 0, 1} -> uint32 {2^32 - 1, 0, 1}: multiplying by 2^32 - 1 negates mod 2^32."""
    return jnp.asarray(signs, jnp.int32).astype(jnp.uint32)


def _active_first(active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices with `active` first (stable) and how many are active: a loop over the first
    `count` entries of `order` visits exactly the active ones. (Skipping inactive entries with
    `lax.cond` instead copies the whole accumulator at every skipped entry on CPU.)"""
    return jnp.argsort(~active, stable=True), jnp.sum(active)


def _pick(table: jax.Array, i: jax.Array) -> jax.Array:
    """table[i] for a traced i, computed as a reduction. An indexed read (dynamic-slice) would be
    fused into the PRG's loop over the words and redone for every word, which keeps XLA:CPU from
    vectorising that loop (7x slower); a reduction is not fused into its consumers."""
    hit = (jnp.arange(table.shape[0]) == i).reshape((-1,) + (1,) * (table.ndim - 1))
    return jnp.sum(jnp.where(hit, table, 0), axis=0, dtype=table.dtype)


def _add_weighted_prgs(start: PyTree, keys: jax.Array, signs: jax.Array) -> PyTree:
    """start + sum_i signs[i] * PRG(keys[i]) mod 2^32, one PRG at a time (memory of one update).

    Only non-zero signs expand a PRG (under vmap, as many as the largest count in the batch).
    """
    keys, weights = jnp.asarray(keys, jnp.uint32), _as_u32_weights(signs)
    order, count = _active_first(weights != 0)

    def body(j: int, acc: PyTree) -> PyTree:
        i = order[j]
        return jax.tree.map(
            lambda x, m: x + _pick(weights, i) * m, acc, expand_mask(_pick(keys, i), acc)
        )

    return jax.lax.fori_loop(0, count, body, start)


def client_masks(
    client_index: int | jax.Array,
    pair_keys: jax.Array,
    pair_signs: jax.Array,
    self_keys: jax.Array,
    like_tree: PyTree,
) -> PyTree:
    """Mask of client u: sum_v pair_signs[u, v] * PRG(pair_keys[u, v]) + PRG(self_keys[u])."""
    self_mask = expand_mask(jnp.asarray(self_keys, jnp.uint32)[client_index], like_tree)
    return _add_weighted_prgs(
        self_mask,
        jnp.asarray(pair_keys, jnp.uint32)[client_index],
        jnp.asarray(pair_signs, jnp.int32)[client_index],
    )


def add_pairwise_masks(stacked: PyTree, pair_keys: jax.Array, pair_signs: jax.Array) -> PyTree:
    """stacked[u] + sum_v pair_signs[u, v] * PRG(pair_keys[u, v]) for every client u (leaves
    uint32[K, ...]), each pair's stream expanded once.

    Clients u and v add the same stream PRG(s_uv) with opposite signs. Simulating both on one
    device, the stream is expanded once and added to both rows: K(K-1)/2 streams instead of the
    K(K-1) of `client_masks`, and none for pairs that are not neighbours this round (sparse
    SecAgg+ graphs, clients outside the cohort). Row u equals what `client_masks` adds, bit for
    bit.
    """
    pair_keys = jnp.asarray(pair_keys, jnp.uint32)
    pair_signs = jnp.asarray(pair_signs, jnp.int32)
    first, second = (jnp.asarray(i, jnp.int32) for i in np.triu_indices(pair_signs.shape[0], 1))
    edge_keys = pair_keys[first, second]
    weight_first = _as_u32_weights(pair_signs[first, second])
    weight_second = _as_u32_weights(pair_signs[second, first])
    order, count = _active_first((weight_first != 0) | (weight_second != 0))
    like = jax.tree.map(lambda x: x[0], stacked)

    def body(j: int, acc: PyTree) -> PyTree:
        e = order[j]
        u, v, w_u, w_v = (_pick(t, e) for t in (first, second, weight_first, weight_second))
        mask = expand_mask(_pick(edge_keys, e), like)
        return jax.tree.map(lambda x, m: x.at[u].add(w_u * m).at[v].add(w_v * m), acc, mask)

    return jax.lax.fori_loop(0, count, body, stacked)


def mask_updates(
    encoded_stacked: PyTree,
    pair_keys: jax.Array,
    pair_signs: jax.Array,
    self_keys: jax.Array,
    *,
    single_device: bool = True,
) -> PyTree:
    """Add every client's mask to its encoded update (leaves uint32[K, ...]).

    `single_device=True`: the client axis is on one device, which expands each pairwise stream
    once for both its clients (`add_pairwise_masks`). `False` (the client axis sharded over
    several devices): each device expands only its own clients' masks (`client_masks`, vmapped).
    Both give the same bits.
    """
    self_keys = jnp.asarray(self_keys, jnp.uint32)
    like = jax.tree.map(lambda x: x[0], encoded_stacked)
    if single_device:
        self_masks = jax.vmap(lambda k: expand_mask(k, like))(self_keys)
        return add_pairwise_masks(_add_u32(encoded_stacked, self_masks), pair_keys, pair_signs)
    masks = jax.vmap(lambda u: client_masks(u, pair_keys, pair_signs, self_keys, like))(
        jnp.arange(self_keys.shape[0])
    )
    return _add_u32(encoded_stacked, masks)


def masked_sum(masked_stacked: PyTree, sent: jax.Array, *, single_device: bool = True) -> PyTree:
    """Sum over the client axis of the inputs with sent[u] = 1, modulo 2^32.

    On one device the rows are added one by one: XLA:CPU fuses the masking into a reduction over
    a short leading axis and runs it 2-3x slower than elementwise adds. Sharded, a reduction
    (an all-reduce across devices).
    """
    sent = jnp.asarray(sent) > 0

    def leaf_sum(x: jax.Array) -> jax.Array:
        kept = jnp.where(sent.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.uint32(0))
        if single_device:
            return functools.reduce(jnp.add, [kept[u] for u in range(kept.shape[0])])
        return jnp.sum(kept, axis=0, dtype=jnp.uint32)

    return jax.tree.map(leaf_sum, masked_stacked)


def unmask(
    masked_sum_tree: PyTree,
    *,
    survivor: jax.Array,
    recovered_self_keys: jax.Array,
    recovered_pair_keys: jax.Array,
    pair_signs: jax.Array,
) -> PyTree:
    """Remove the masks left in a masked sum of the survivors' inputs.

    Left over are PRG(b_u) for each survivor u and, for each survivor u with a dropped neighbour
    v, the term pair_signs[u, v] * PRG(s_uv) whose cancelling partner v never sent. Dropped
    neighbours are those with a non-zero sign that are not survivors; clients that took no part
    in the round have all-zero signs and never contribute.
    """
    alive = (jnp.asarray(survivor) > 0).astype(jnp.int32)
    signs = jnp.asarray(pair_signs, jnp.int32)
    num_clients = signs.shape[0]
    dangling = signs * alive[:, None] * (1 - alive)[None, :]
    keys = jnp.concatenate(
        [
            jnp.asarray(recovered_pair_keys, jnp.uint32).reshape(num_clients * num_clients, 2),
            jnp.asarray(recovered_self_keys, jnp.uint32),
        ],
        axis=0,
    )
    weights = jnp.concatenate([dangling.reshape(-1), alive])
    return _add_weighted_prgs(masked_sum_tree, keys, -weights)


def secure_sum(
    updates_stacked: PyTree,
    participating: jax.Array,
    survivor: jax.Array,
    key: jax.Array,
    secagg_inputs: SecAggInputs,
    *,
    clip: float,
    scale: float,
    single_device: bool = True,
    client_ids: jax.Array | None = None,
) -> PyTree:
    """Sum of the survivors' clipped updates, computed through encode -> mask -> sum -> unmask.

    Returns the (float32) sum, not the mean: a weighted mean needs the weights folded into the
    updates by the caller (and the total weight aggregated alongside). Senders are clients with
    participating[u] * survivor[u] = 1. The rounding key of client u is fold_in(key, id_u), id_u
    = client_ids[u] (default u: the axis is the hospitals), so a hospital rounds with the same
    coins whichever slot of the round's client axis it takes.
    `single_device`: whether the client axis is on one device (see `mask_updates`).
    """
    num_clients = jnp.shape(participating)[0]
    # One flat vector per client: each PRG below is then one Threefry stream over the whole
    # update instead of one per pytree leaf, which keeps the compiled round small (ResNet-18:
    # 62 leaves, x (K + 2) PRG sites) and fast to compile.
    leaves, treedef = jax.tree.flatten(updates_stacked)
    flat = jnp.concatenate([x.reshape(num_clients, -1) for x in leaves], axis=1)
    ids = jnp.arange(num_clients) if client_ids is None else client_ids
    client_keys = jax.vmap(lambda u: jax.random.fold_in(key, u))(ids)
    encoded = jax.vmap(lambda t, k: encode(t, k, clip=clip, scale=scale))(flat, client_keys)
    masked = mask_updates(
        encoded,
        secagg_inputs.pair_keys,
        secagg_inputs.pair_signs,
        secagg_inputs.self_keys,
        single_device=single_device,
    )
    sent = jnp.asarray(participating, jnp.float32) * jnp.asarray(survivor, jnp.float32)
    total = unmask(
        masked_sum(masked, sent, single_device=single_device),
        survivor=sent,
        recovered_self_keys=secagg_inputs.recovered_self_keys,
        recovered_pair_keys=secagg_inputs.recovered_pair_keys,
        pair_signs=secagg_inputs.pair_signs,
    )
    summed = decode(total, scale=scale)
    offsets = np.cumsum([0] + [math.prod(x.shape[1:]) for x in leaves])
    return jax.tree.unflatten(
        treedef,
        [
            summed[lo:hi].reshape(x.shape[1:])
            for x, lo, hi in zip(leaves, offsets[:-1], offsets[1:], strict=True)
        ],
    )
