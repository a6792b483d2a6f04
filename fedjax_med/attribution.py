"""Integrated-gradients attribution maps and agreement scores between two maps, in pure JAX.

Integrated gradients (Sundararajan et al. 2017) attributes f(x) - f(baseline) to the input pixels:

    IG_i(x) = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da.

The integral is taken with the trapezoid rule on `steps` equal intervals, which makes the
*completeness* axiom, sum_i IG_i = f(x) - f(x'), hold up to the quadrature error (it shrinks as
1/steps^2 for smooth f; tests check it). The baseline defaults to a black image (all zeros),
the usual choice for radiographs.

Agreement between two attribution maps (e.g. a federated and a centralised model explaining the
same image and finding) is measured on the per-pixel magnitude |IG| summed over channels:
  * `spearman`: Spearman rank correlation of the two maps over all pixels (1 = same ordering of
    pixel importance, 0 = unrelated), ties broken by position (continuous maps have few ties);
  * `topk_overlap`: intersection over union of the two maps' top `fraction` most important pixels
    (1 = the models look at the same pixels).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def integrated_gradients(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 64,
    chunk_size: int | None = None,
) -> jax.Array:
    """Integrated gradients of a scalar function of one input.

    Args:
      fn: x -> scalar (e.g. one logit of a model applied to a single image [H, W, C]).
      x: the input.
      baseline: the reference input (default zeros, like x).
      steps: intervals of the trapezoid rule along the straight path baseline -> x.
      chunk_size: evaluate this many path points at a time (bounds memory for big models;
        None = all steps + 1 at once).
    Returns:
      Attributions with the shape of x.
    """
    baseline = jnp.zeros_like(x) if baseline is None else baseline
    alphas = jnp.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
    path = baseline[None] + alphas.reshape(-1, *([1] * x.ndim)) * (x - baseline)[None]
    grad_fn = jax.grad(lambda z: jnp.asarray(fn(z), jnp.float32).reshape(()))
    grads = jax.lax.map(grad_fn, path, batch_size=chunk_size or steps + 1)
    # Trapezoid weights: half weight on the two end points.
    weights = jnp.full(steps + 1, 1.0 / steps, x.dtype).at[0].mul(0.5).at[-1].mul(0.5)
    return (x - baseline) * jnp.tensordot(weights, grads, axes=1)


def model_integrated_gradients(
    apply_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    class_index: jax.Array,
    *,
    steps: int = 64,
    chunk_size: int | None = None,
) -> jax.Array:
    """IG of the logit `class_index[b]` of a classifier for each image b (baseline: zeros).

    Args:
      apply_fn: images [B, H, W, C] -> logits [B, num_classes].
      images: [B, H, W, C].
      class_index: int [B], which output each image is explained for.
    Returns:
      Attributions [B, H, W, C].
    """

    def one(image, cls):
        logit = lambda z: apply_fn(z[None])[0, cls]
        return integrated_gradients(logit, image, steps=steps, chunk_size=chunk_size)

    return jax.jit(jax.vmap(one))(images, jnp.asarray(class_index))


def saliency(attributions: jax.Array) -> jax.Array:
    """[..., H, W, C] attributions -> [..., H, W] importance |IG| summed over channels."""
    return jnp.abs(attributions).sum(-1)


def _ranks(values: jax.Array) -> jax.Array:
    return jnp.argsort(jnp.argsort(values)).astype(jnp.float32)


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman rank correlation between two maps of equal shape (flattened)."""
    ra, rb = _ranks(a.ravel()), _ranks(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra * rb).sum() / jnp.sqrt((ra**2).sum() * (rb**2).sum())


def topk_overlap(a: jax.Array, b: jax.Array, fraction: float = 0.1) -> jax.Array:
    """Intersection over union of the top `fraction` entries of two maps of equal shape."""
    a, b = a.ravel(), b.ravel()
    k = max(1, int(round(fraction * a.size)))
    in_a = jnp.zeros(a.size, bool).at[jnp.argsort(-a)[:k]].set(True)
    in_b = jnp.zeros(b.size, bool).at[jnp.argsort(-b)[:k]].set(True)
    return (in_a & in_b).sum() / (in_a | in_b).sum()
