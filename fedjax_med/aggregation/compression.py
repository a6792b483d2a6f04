"""Hospital -> server update compression, as optax-style init/apply pairs, plus exact byte counts.

`compressor(kind, ...)` returns `Compressor(init, apply)` for ONE hospital (`make_compressor`
reads a run's `config.compression`); the round vmaps it over the client axis:

  state = compressor.init(params)                       # per-hospital state (pytree)
  values, state = compressor.apply(update, state, key)  # what the server receives, dequantised

Kinds:
  'none'      float32 updates.
  'quantize'  unbiased stochastic uniform quantisation to `bits` bits over each leaf's
              [min, max] (Alistarh et al. 2017, QSGD-style), optionally after a randomised
              Hadamard rotation that spreads the mass evenly over coordinates and so shrinks
              [min, max] (Suresh et al. 2017). The rotation key is common randomness derived
              from the round key, so it costs no bytes.
  'topk'      keep the largest `topk_fraction` of |update + residual| per leaf and carry the rest
              to the next round (error feedback, Stich et al. 2018; Karimireddy et al. 2019).

The simulation returns dequantised / densified float values; `bytes_per_update` gives the
size of the message a hospital would actually send.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KINDS = ('none', 'quantize', 'topk')
# Per-leaf side information of the quantiser: offset (min) and step size, float32 each.
_QUANTIZE_SIDE_BYTES = 8
# Top-k sends (float32 value, uint32 flat index) pairs.
_TOPK_ENTRY_BYTES = 4 + 4


class Compressor(NamedTuple):
    init: Callable[[PyTree], PyTree]
    apply: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]


# ---------------------------------------------------------------------------------------------
# Stochastic quantisation
# ---------------------------------------------------------------------------------------------


def stochastic_quantize(tree: PyTree, key: jax.Array, bits: int) -> PyTree:
    """Unbiased `bits`-bit quantisation of each leaf on the grid min + i*(max-min)/(2^bits-1).

    Each value rounds to one of its two neighbouring grid points with probabilities that make
    the expectation exact. Returns the dequantised values (a constant leaf is returned as is).
    """
    if not 1 <= bits <= 24:
        raise ValueError(f'compression.bits={bits}: use 1..24 bits per coordinate.')
    levels = 2**bits - 1
    leaves, treedef = jax.tree.flatten(tree)

    def quantize_leaf(i: int, x: jax.Array) -> jax.Array:
        lo, hi = jnp.min(x), jnp.max(x)
        step = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
        y = (x - lo) / step
        floor = jnp.floor(y)
        up = jax.random.uniform(jax.random.fold_in(key, i), x.shape) < (y - floor)
        q = jnp.clip(floor + up, 0, levels)
        return jnp.where(hi > lo, lo + q * step, x).astype(x.dtype)

    return jax.tree.unflatten(treedef, [quantize_leaf(i, x) for i, x in enumerate(leaves)])


# ---------------------------------------------------------------------------------------------
# Randomised Hadamard rotation
# ---------------------------------------------------------------------------------------------


def padded_size(n: int) -> int:
    """Length of a flattened leaf of n entries after padding to a power of two."""
    return 1 << max(0, (n - 1).bit_length())


def _fwht(x: jax.Array) -> jax.Array:
    """Orthonormal fast Walsh-Hadamard transform of a 1-D power-of-two-length vector."""
    n = x.shape[0]
    h = 1
    while h < n:  # log2(n) static butterflies
        pairs = x.reshape(n // (2 * h), 2, h)
        a, b = pairs[:, 0], pairs[:, 1]
        x = jnp.stack([a + b, a - b], axis=1).reshape(n)
        h *= 2
    return x / math.sqrt(n)


def _signs(key: jax.Array, i: int, n: int) -> jax.Array:
    return jax.random.rademacher(jax.random.fold_in(key, i), (n,), dtype=jnp.float32)


def randomized_hadamard(tree: PyTree, key: jax.Array) -> PyTree:
    """H D x per leaf: flatten, zero-pad to a power of two, flip signs at random, FWHT.

    The output leaves are 1-D of length `padded_size(leaf.size)`; H D is orthonormal.
    """
    leaves, treedef = jax.tree.flatten(tree)

    def rotate(i: int, x: jax.Array) -> jax.Array:
        n = padded_size(x.size)
        flat = jnp.pad(x.reshape(-1).astype(jnp.float32), (0, n - x.size))
        return _fwht(_signs(key, i, n) * flat)

    return jax.tree.unflatten(treedef, [rotate(i, x) for i, x in enumerate(leaves)])


def inverse_randomized_hadamard(rotated: PyTree, key: jax.Array, like_tree: PyTree) -> PyTree:
    """(H D)^-1 y = D H y per leaf, cropped and reshaped like `like_tree` (same key as forward)."""
    rotated_leaves = jax.tree.leaves(rotated)
    like_leaves, treedef = jax.tree.flatten(like_tree)

    def unrotate(i: int, y: jax.Array, like: jax.Array) -> jax.Array:
        x = _signs(key, i, y.shape[0]) * _fwht(y)
        return x[: like.size].reshape(like.shape).astype(like.dtype)

    return jax.tree.unflatten(
        treedef,
        [
            unrotate(i, y, x)
            for i, (y, x) in enumerate(zip(rotated_leaves, like_leaves, strict=True))
        ],
    )


# ---------------------------------------------------------------------------------------------
# Top-k with error feedback
# ---------------------------------------------------------------------------------------------


def topk_count(n: int, fraction: float) -> int:
    """Entries kept from a leaf of n entries: ceil(fraction * n), at least one."""
    return min(n, max(1, math.ceil(fraction * n)))


def _topk_leaf(x: jax.Array, fraction: float) -> jax.Array:
    flat = x.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), topk_count(flat.size, fraction))
    return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(x.shape)


def topk_error_feedback(fraction: float) -> Compressor:
    """Per-leaf top-k sparsification; what is not sent is kept and added to the next update."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'compression.topk_fraction={fraction}: must lie in (0, 1].')

    def init(params: PyTree) -> PyTree:
        return jax.tree.map(jnp.zeros_like, params)

    def apply(update: PyTree, residual: PyTree, key: jax.Array | None = None):
        del key  # deterministic
        corrected = jax.tree.map(jnp.add, update, residual)
        sent = jax.tree.map(lambda x: _topk_leaf(x, fraction), corrected)
        return sent, jax.tree.map(jnp.subtract, corrected, sent)

    return Compressor(init, apply)


# ---------------------------------------------------------------------------------------------
# The compressor and its byte counts
# ---------------------------------------------------------------------------------------------


def _check(kind: str, rotate: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f'compression.kind={kind!r}: use one of {", ".join(KINDS)}.')
    if rotate and kind != 'quantize':
        # A rotation spreads mass evenly over coordinates: it helps quantisation, defeats top-k.
        raise ValueError(
            f'compression.rotate=True with kind={kind!r}: rotation only applies to quantize.'
        )


def compressor(
    kind: str, bits: int = 8, topk_fraction: float = 0.01, rotate: bool = False
) -> Compressor:
    """init/apply pair for one hospital (see the module docstring)."""
    _check(kind, rotate)
    if kind == 'topk':
        return topk_error_feedback(topk_fraction)

    def init(params: PyTree) -> PyTree:
        del params
        return ()

    if kind == 'none':
        return Compressor(init, lambda update, state, key: (update, state))
    if not 1 <= bits <= 24:
        raise ValueError(f'compression.bits={bits}: use 1..24 bits per coordinate.')

    def apply(update: PyTree, state: PyTree, key: jax.Array) -> tuple[PyTree, PyTree]:
        rotate_key, round_key = jax.random.split(key)
        if not rotate:
            return stochastic_quantize(update, round_key, bits), state
        rotated = randomized_hadamard(update, rotate_key)
        quantized = stochastic_quantize(rotated, round_key, bits)
        return inverse_randomized_hadamard(quantized, rotate_key, update), state

    return Compressor(init, apply)


def make_compressor(cc) -> Compressor | None:
    """The per-hospital update compressor of `config.compression`, or None when updates are sent
    as float32."""
    if cc.kind == 'none':
        return None
    return compressor(cc.kind, bits=cc.bits, topk_fraction=cc.topk_fraction, rotate=cc.rotate)


def _sizes(params_like: PyTree) -> list[int]:
    return [math.prod(np.shape(x)) for x in jax.tree.leaves(params_like)]


def bytes_per_update(
    params_like: PyTree,
    *,
    kind: str,
    bits: int = 8,
    topk_fraction: float = 0.01,
    rotate: bool = False,
) -> int:
    """Exact payload of one hospital's update message, in bytes.

    none: 4 bytes per parameter. quantize: per leaf ceil(n * bits / 8) packed levels plus 8 bytes
    (float32 min and step); with `rotate`, n is the leaf size padded to a power of two. topk: per
    leaf k = ceil(fraction * n) (at least 1) pairs of float32 value and uint32 flat index.
    """
    _check(kind, rotate)
    sizes = _sizes(params_like)
    if kind == 'none':
        return 4 * sum(sizes)
    if kind == 'quantize':
        return sum(
            math.ceil((padded_size(n) if rotate else n) * bits / 8) + _QUANTIZE_SIDE_BYTES
            for n in sizes
        )
    return sum(_TOPK_ENTRY_BYTES * topk_count(n, topk_fraction) for n in sizes)


def broadcast_bytes(params_like: PyTree, dtype: Any = jnp.float32) -> int:
    """Server -> hospital model broadcast in `dtype` (e.g. float32 or bfloat16), in bytes."""
    return np.dtype(dtype).itemsize * sum(_sizes(params_like))
