"""Sample-level DP-SGD on the device: per-example clipping, masking and Gaussian noise.

One hospital's private gradient for one local step (Abadi et al. 2016):

        g = (sum_i mask_i * clip_C(grad loss_i) + N(0, (z * C)^2 I)) / expected_batch_size

Every function here is pure and jittable; `rounds.py` vmaps them over the leading client axis.
Sampling itself is not done here: the host builds a fixed-size batch `[B, ...]` plus a Poisson
mask `[B]` (each example kept with probability q), so that one compilation serves every step.
The denominator is the *expected* batch size q * n_k, never the realised count: dividing by the
realised count would make the output depend on whether an example was sampled beyond the noise
the accountant (`accounting.py`) assumes.

Memory: per-example gradients cost B x |params|. With `chunk_size` set, they are materialised
for `chunk_size` examples at a time inside a `jax.lax.scan`, clipped and summed, so the peak is
chunk_size x |params| and the result is identical to the unchunked path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
PerExampleLossFn = Callable[[PyTree, PyTree], jax.Array]


def global_norms(tree: PyTree) -> jax.Array:
    """L2 norm over the whole pytree for each index of the leading axis: `[N, ...]` -> `[N]`."""
    squares = [
        jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)), axis=1)
        for leaf in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def _scale_leading(tree: PyTree, scale: jax.Array) -> PyTree:
    """Multiplies slice i of every leaf (leading axis) by scale[i]."""
    return jax.tree.map(
        lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), tree
    )


def clip_by_global_norm_per_example(
    grads: PyTree, clip_norm: float | jax.Array
) -> tuple[PyTree, jax.Array]:
    """Scales each example's gradient by min(1, C / ||g_i||), the norm taken over the whole pytree.

    Args:
        grads: pytree whose leaves have a leading example axis `[B, ...]`.
        clip_norm: C > 0.

    Returns:
        (clipped grads with the same structure, pre-clip norms float32[B]). Examples whose norm is
        at most C are returned unchanged (scale exactly 1).
    """
    norms = global_norms(grads)
    # max(norm, tiny) keeps zero gradients finite: C / tiny is huge and the min picks 1.
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
    return _scale_leading(grads, scale), norms


def add_gaussian_noise(tree: PyTree, key: jax.Array, std: float | jax.Array) -> PyTree:
    """Adds i.i.d. N(0, std^2) to every coordinate, with an independent key per leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = [
        leaf + (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noised)


class _ChunkStats(NamedTuple):
    """Sums over real (mask=1) examples, reduced to the aux metrics at the end."""

    num_real: jax.Array
    num_clipped: jax.Array
    norm_sum: jax.Array
    loss_sum: jax.Array


def _clipped_sum(
    per_example_loss_fn: PerExampleLossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    clip_norm: float,
) -> tuple[PyTree, _ChunkStats]:
    """Sum of clipped per-example gradients over the examples with mask=1, plus statistics."""
    losses, grads = jax.vmap(jax.value_and_grad(per_example_loss_fn), in_axes=(None, 0))(
        params, batch
    )
    clipped, norms = clip_by_global_norm_per_example(grads, clip_norm)
    # jnp.where, not a multiply: a padded/unsampled example with a NaN/inf gradient must still
    # contribute exactly zero.
    summed = jax.tree.map(
        lambda g: jnp.sum(jnp.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), axis=0),
        clipped,
    )
    stats = _ChunkStats(
        num_real=jnp.sum(mask, dtype=jnp.float32),
        num_clipped=jnp.sum(mask & (norms > clip_norm), dtype=jnp.float32),
        norm_sum=jnp.sum(jnp.where(mask, norms, 0.0)),
        loss_sum=jnp.sum(jnp.where(mask, losses.astype(jnp.float32), 0.0)),
    )
    return summed, stats


def _pad_to_multiple(batch: PyTree, mask: jax.Array, chunk_size: int) -> tuple[PyTree, jax.Array]:
    """Pads the example axis to a multiple of chunk_size with copies of real data, masked out.

    Copies (rather than zeros) keep the padded forward pass numerically ordinary.
    """
    size = mask.shape[0]
    padded = -(-size // chunk_size) * chunk_size
    if padded == size:
        return batch, mask
    index = jnp.arange(padded) % size
    batch = jax.tree.map(lambda x: jnp.take(x, index, axis=0), batch)
    mask = jnp.concatenate([mask, jnp.zeros((padded - size,), bool)])
    return batch, mask


# Long on purpose: the per-example clip, masked sum and noise of one DP-SGD step are one
# mechanism, kept in one place where it can be read against the accountant's assumptions.
def dp_gradient(
    per_example_loss_fn: PerExampleLossFn,
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    key: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | jax.Array,
    chunk_size: int | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Private gradient of one DP-SGD step: clip per example, mask, sum, noise, normalise.

    Args:
        per_example_loss_fn: `(params, example) -> scalar` for ONE example (a slice of `batch`
            without its leading axis).
        params: parameter pytree.
        batch: pytree whose leaves have leading axis B (the fixed max batch).
        mask: bool/float [B]; nonzero = Poisson-sampled real example. Treated as a 0/1 indicator
            (weights other than 0/1 would change the sensitivity the accountant assumes). Masked
            examples contribute exactly zero, whatever their data.
        key: PRNG key for the noise.
        clip_norm: per-example L2 bound C (over the whole parameter pytree).
        noise_multiplier: z; noise std per coordinate is z * C before normalisation.
        expected_batch_size: denominator, q * n_k for this hospital; may be traced.
        chunk_size: if set, per-example gradients are computed this many at a time (memory);
            B need not be divisible: the last chunk is padded with masked-out copies.

    Returns:
        (noised mean gradient with the structure of `params`, aux) where aux has float32 scalars
        'clip_fraction' (real examples with norm > C / real examples), 'grad_norm_mean' (mean
        pre-clip norm over real examples) and 'loss' (mean loss over real examples); all three are
        0 when no example is real. aux is computed from unnoised data and is itself not private:
        report it only in aggregate or through the accountant's lens.
    """
    mask = jnp.asarray(mask).astype(bool)
    if chunk_size is None or chunk_size >= mask.shape[0]:
        summed, stats = _clipped_sum(per_example_loss_fn, params, batch, mask, clip_norm)
    else:
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be a positive integer or None, got {chunk_size}.')
        batch, mask = _pad_to_multiple(batch, mask, chunk_size)
        # Only the chunks up to the last sampled example run: a Poisson batch is padded to a
        # size it rarely reaches (data/batching.py), and the chunks past its draw are all masked
        # out, so skipping them changes nothing (each would add exact zeros).
        last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[0]) + 1, 0))
        num_chunks = (last + chunk_size - 1) // chunk_size

        def accumulate(i, carry):
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk_size, chunk_size)
            chunk_batch, chunk_mask = jax.tree.map(take, (batch, mask))
            summed, stats = _clipped_sum(
                per_example_loss_fn, params, chunk_batch, chunk_mask, clip_norm
            )
            return jax.tree.map(jnp.add, carry, (summed, stats))

        zeros = (
            jax.tree.map(jnp.zeros_like, params),
            _ChunkStats(*(jnp.zeros((), jnp.float32) for _ in _ChunkStats._fields)),
        )
        summed, stats = jax.lax.fori_loop(0, num_chunks, accumulate, zeros)

    # where(z == 0) keeps a non-private run (z = 0) exact even with an infinite clip_norm.
    std = jnp.where(noise_multiplier == 0, 0.0, noise_multiplier * clip_norm)
    noised = add_gaussian_noise(summed, key, std)
    grads = jax.tree.map(lambda g: g / jnp.asarray(expected_batch_size, g.dtype), noised)

    denominator = jnp.maximum(stats.num_real, 1.0)
    aux = {
        'clip_fraction': stats.num_clipped / denominator,
        'grad_norm_mean': stats.norm_sum / denominator,
        'loss': stats.loss_sum / denominator,
    }
    return grads, aux
