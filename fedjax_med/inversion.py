"""Gradient inversion: what a curious server can see of a hospital's images in its update.

"Inverting Gradients" (Geiping, Bauermeister, Dröge and Moeller, NeurIPS 2020): the server
knows the model it broadcast, w, and receives a hospital's gradient g = grad_w L(w; x, y) (or the
update of one local step, -lr * g). It optimises dummy images x' so that their gradient points
the same way as the observed one,

    x* = argmin_{x' in [0, 1]^n}  1 - <grad_w L(w; x', y), g> / (|grad_w L(w; x', y)| |g|)
                                  + tv_weight * TV(x'),

with Adam on the sign of the gradient (their "signed" variant), the box constraint enforced by
clipping after each step, and the anisotropic total variation TV(x') (mean absolute difference of
neighbouring pixels) as the image prior. The cosine distance ignores the gradient's scale, so a
one-step update -lr * g is inverted the same way, whatever the learning rate. Labels are taken as
known (for one image they are recoverable from the sign of the last layer's gradient; Zhao et al.
2020, "iDLG"), which only helps the attacker.

`attack_cases` runs the attack in the three situations this repository simulates:

- **plain**: the hospital's non-private mean gradient of a small batch;
- **dp_sgd**: the same batch through `privacy.dp_sgd.dp_gradient` (per-example clipping to C,
  Gaussian noise of std sigma * C): the noise, sigma * C * sqrt(#params) in norm, buries a
  signal of norm at most B * C, and the reconstruction fails;
- **secagg**: what the server holds of one hospital under secure aggregation: its gradient encoded
  to fixed point in Z_{2^32} (`aggregation.secure.encode`) and masked (`mask_updates`, a self mask
  and a pairwise mask), read back as int32 / Q. The masked word is uniform on the ring whatever the
  update, so the attack inverts noise.

Quality is measured by PSNR (data range 1) and SSIM (`ssim`: the Gaussian-window SSIM of Wang,
Bovik, Sheikh and Simoncelli 2004, "Image quality assessment: from error visibility to structural
similarity": 11 x 11 window of std 1.5, K1 = 0.01, K2 = 0.03, the mean of the SSIM map over the
valid window positions, as their reference implementation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
CASES = ('plain', 'dp_sgd', 'secagg')


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------


def cosine_distance(a: PyTree, b: PyTree) -> jax.Array:
    """1 - cos(a, b) over whole pytrees (each flattened to one vector)."""
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    norm_a = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(a)))
    norm_b = jnp.sqrt(sum(jnp.vdot(y, y) for y in jax.tree.leaves(b)))
    return 1.0 - dot / jnp.maximum(norm_a * norm_b, 1e-30)


def total_variation(images: jax.Array) -> jax.Array:
    """Anisotropic TV of [B, H, W, C] images: mean |difference| of vertical and horizontal
    neighbours."""
    dy = jnp.abs(images[:, 1:] - images[:, :-1]).mean()
    dx = jnp.abs(images[:, :, 1:] - images[:, :, :-1]).mean()
    return dx + dy


def mean_loss_gradient(apply_fn: Callable, loss: Callable, params: PyTree) -> Callable:
    """(images [B, ...], labels [B, ...]) -> gradient w.r.t. `params` of the mean per-example
    `loss(logits, labels)`: what a hospital computes in one non-private step."""

    def grad(images, labels):
        return jax.grad(lambda p: loss(apply_fn(p, images), labels).mean())(params)

    return grad


def make_inverter(
    gradient_fn: Callable[[jax.Array, jax.Array], PyTree],
    *,
    steps: int = 300,
    learning_rate: float = 0.1,
    tv_weight: float = 1e-2,
) -> Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The attack, compiled once: jitted (target, labels, start images) -> (reconstruction, the
    objective at every step). See `invert` for the arguments."""
    schedule = optax.piecewise_constant_schedule(
        learning_rate, {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)}
    )
    optimizer = optax.adam(schedule)

    @jax.jit
    def run(target, labels, x0):
        def objective(x):
            distance = cosine_distance(gradient_fn(x, labels), target)
            return distance + tv_weight * total_variation(x)

        def step(carry, _):
            x, state = carry
            value, g = jax.value_and_grad(objective)(x)
            updates, state = optimizer.update(jnp.sign(g), state, x)
            x = jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0)
            return (x, state), value

        (x, _), values = jax.lax.scan(step, (x0, optimizer.init(x0)), None, length=steps)
        return x, values

    return run


def invert(
    gradient_fn: Callable[[jax.Array, jax.Array], PyTree],
    target: PyTree,
    labels: jax.Array,
    shape: tuple[int, ...],
    key: jax.Array,
    *,
    steps: int = 300,
    learning_rate: float = 0.1,
    tv_weight: float = 1e-2,
) -> tuple[jax.Array, jax.Array]:
    """Reconstructs images whose gradient matches `target` in direction (module docstring).

    Args:
      gradient_fn: (images, labels) -> gradient pytree, the attacker's copy of the hospital's
        computation (e.g. `mean_loss_gradient`).
      target: the observed gradient or one-step update (same structure).
      labels: the labels of the batch (known to the attacker).
      shape: [B, H, W, C] of the batch.
      key: the dummy images' random start (uniform on [0, 1]).
      steps: Adam steps; learning_rate: Adam's, decayed by 10x at 3/8, 5/8 and 7/8 of the steps
        (Geiping et al.'s schedule); tv_weight: weight of the total-variation prior.
    Returns:
      (reconstructed images in [0, 1] with `shape`, the objective at every step [steps]).
    """
    run = make_inverter(gradient_fn, steps=steps, learning_rate=learning_rate, tv_weight=tv_weight)
    return run(target, labels, jax.random.uniform(key, shape, jnp.float32))


# ---------------------------------------------------------------------------------------------
# What the server observes in each case
# ---------------------------------------------------------------------------------------------


def dp_sgd_gradient(
    apply_fn: Callable,
    loss: Callable,
    params: PyTree,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
) -> PyTree:
    """The hospital's DP-SGD gradient of the batch (every example sampled): `dp_gradient`."""
    from fedjax_med.client import per_example_loss_fn
    from fedjax_med.privacy import dp_sgd

    grads, _ = dp_sgd.dp_gradient(
        per_example_loss_fn(apply_fn, loss),
        params,
        {'image': images, 'label': labels},
        jnp.ones(images.shape[0], bool),
        key,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
    )
    return grads


def secagg_view(update: PyTree, key: jax.Array, *, clip: float, num_clients: int) -> PyTree:
    """What the server receives from one hospital under SecAgg, read as numbers: the update
    encoded (`secure.encode`, the run's scale for `num_clients`), masked with a self mask and one
    pairwise mask (`secure.mask_updates` over this hospital and a neighbour), decoded as int32 / Q.
    """
    from fedjax_med.aggregation import secure

    scale = secure.scale_for(clip, num_clients)
    leaves, treedef = jax.tree.flatten(update)
    flat = jnp.concatenate([x.reshape(-1) for x in leaves])
    k_encode, k_self, k_pair = jax.random.split(key, 3)
    encoded = secure.encode(flat, k_encode, clip=clip, scale=scale)
    words = lambda k, shape: jax.random.bits(k, shape, jnp.uint32)
    pair = words(k_pair, (2,))
    pair_keys = jnp.zeros((2, 2, 2), jnp.uint32).at[0, 1].set(pair).at[1, 0].set(pair)
    signs = jnp.array([[0, 1], [-1, 0]], jnp.int32)
    masked = secure.mask_updates(
        jnp.stack([encoded, jnp.zeros_like(encoded)]), pair_keys, signs, words(k_self, (2, 2))
    )[0]
    seen = secure.decode(masked, scale=scale)
    offsets = np.cumsum([0] + [x.size for x in leaves])
    return jax.tree.unflatten(
        treedef,
        [
            seen[lo:hi].reshape(x.shape)
            for x, lo, hi in zip(leaves, offsets[:-1], offsets[1:], strict=True)
        ],
    )


# Long on purpose: the three cases share one batch, one attacker model and one metric loop, and
# reading them side by side is the point (the same attack, three things the server can see).
def attack_cases(
    apply_fn: Callable,
    loss: Callable,
    params: PyTree,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    steps: int = 300,
    learning_rate: float = 0.1,
    tv_weight: float = 1e-2,
    clip_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    expected_batch_size: float | None = None,
    secagg_clip: float = 1.0,
    num_clients: int = 5,
    cases: tuple[str, ...] = CASES,
) -> dict:
    """Inverts one hospital's observed gradient of (images, labels) at `params` in each case.

    Args:
      apply_fn: (params, images) -> logits; loss: (logits, labels) -> per-example loss.
      images: float32 [B, H, W, C] in [0, 1], the hospital's batch; labels: [B, ...].
      seed: randomness of the noise, the masks and the dummy images.
      steps, learning_rate, tv_weight: `invert`'s.
      clip_norm, noise_multiplier, expected_batch_size: DP-SGD's C, sigma and denominator
        (default B).
      secagg_clip, num_clients: SecAgg's per-coordinate clip and the cohort size that sets Q.
    Returns:
      {case: {'reconstruction': [B, H, W, C], 'psnr': [B], 'ssim': [B], 'psnr_mean',
      'ssim_mean', 'objective_final', 'gradient_cosine' (cos of the observed gradient with the
      true non-private one)}}.
    """
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    key = jax.random.key(seed)
    k_noise, k_mask, k_init = jax.random.split(key, 3)
    gradient_fn = mean_loss_gradient(apply_fn, loss, params)
    true = jax.jit(gradient_fn)(images, labels)
    observed = {}
    if 'plain' in cases:
        observed['plain'] = true
    if 'dp_sgd' in cases:
        dp = lambda p, x, y, k: dp_sgd_gradient(
            apply_fn,
            loss,
            p,
            x,
            y,
            k,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=float(expected_batch_size or images.shape[0]),
        )
        observed['dp_sgd'] = jax.jit(dp)(params, images, labels, k_noise)
    if 'secagg' in cases:
        view = lambda g, k: secagg_view(g, k, clip=secagg_clip, num_clients=num_clients)
        observed['secagg'] = jax.jit(view)(true, k_mask)
    result = {}
    originals = np.asarray(images)
    run = make_inverter(gradient_fn, steps=steps, learning_rate=learning_rate, tv_weight=tv_weight)
    start = jax.random.uniform(k_init, images.shape, jnp.float32)
    for case, target in observed.items():
        # The SecAgg view is float32 like the others: one compilation serves every case.
        target = jax.tree.map(lambda t, g: jnp.asarray(t, g.dtype), target, true)
        recon, values = run(target, labels, start)
        recon = np.asarray(recon)
        p = psnr(recon, originals)
        s = np.array([ssim(r, o) for r, o in zip(recon, originals, strict=True)])
        result[case] = {
            'reconstruction': recon,
            'psnr': p,
            'ssim': s,
            'psnr_mean': float(p.mean()),
            'ssim_mean': float(s.mean()),
            'objective_final': float(values[-1]),
            'gradient_cosine': float(1.0 - cosine_distance(target, true)),
        }
    return result


# ---------------------------------------------------------------------------------------------
# Image quality
# ---------------------------------------------------------------------------------------------


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image of [B, ...] batches (inf if identical)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    with np.errstate(divide='ignore'):
        return 10.0 * np.log10(data_range**2 / mse)


def flat_image_psnr(images: np.ndarray) -> np.ndarray:
    """PSNR of each image against a flat image at its own mean: the score of a reconstruction
    that knows only the brightness (on the synthetic X-rays, about 11-17 dB; a failed attack
    that ends near a flat grey image scores about this)."""
    images = np.asarray(images, np.float64)
    flat = np.broadcast_to(
        images.mean(axis=tuple(range(1, images.ndim)), keepdims=True), images.shape
    )
    return psnr(flat, images)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 2-D Gaussian window [size, size] of Wang et al."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Correlation of a 2-D image with `window` at the positions where it fits ('valid')."""
    from numpy.lib.stride_tricks import sliding_window_view

    patches = sliding_window_view(image, window.shape)
    return np.einsum('ijkl,kl->ij', patches, window)


def ssim(
    x: np.ndarray,
    y: np.ndarray,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean SSIM of two images [H, W] or [H, W, C] (channels averaged), Wang et al. 2004:

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2
               + C2)),  C1 = (K1 L)^2, C2 = (K2 L)^2,

    local statistics weighted by the Gaussian window, averaged over the valid positions. An image
    smaller than the window uses a window as large as the image (odd)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f'ssim: shapes {x.shape} and {y.shape} differ.')
    if x.ndim == 3:
        return float(np.mean([ssim(x[..., c], y[..., c], data_range=data_range,
                                   window_size=window_size, sigma=sigma, k1=k1, k2=k2)
                              for c in range(x.shape[-1])]))  # fmt: skip
    size = min(window_size, *(s - (1 - s % 2) for s in x.shape))
    w = gaussian_window(size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
    var_x = _filter_valid(x * x, w) - mu_x**2
    var_y = _filter_valid(y * y, w) - mu_y**2
    cov = _filter_valid(x * y, w) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def figure(path: str, originals: np.ndarray, result: dict, title: str = '') -> str:
    """PNG of the originals (top row) and each case's reconstructions with PSNR / SSIM."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cases = [c for c in CASES if c in result]
    rows, cols = 1 + len(cases), originals.shape[0]
    fig = Figure(figsize=(max(1.8 * cols + 0.6, 4.0), 1.8 * rows + 0.4))
    FigureCanvasAgg(fig)
    names = {'plain': 'no DP', 'dp_sgd': 'DP-SGD', 'secagg': 'SecAgg (masked)'}
    for r, (label, imgs) in enumerate(
        [('original', originals)] + [(names[c], result[c]['reconstruction']) for c in cases]
    ):
        for b in range(cols):
            ax = fig.add_subplot(rows, cols, r * cols + b + 1)
            ax.imshow(np.asarray(imgs[b])[..., 0], cmap='gray', vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r:
                case = result[cases[r - 1]]
                ax.set_title(f'{case["psnr"][b]:.1f} dB, SSIM {case["ssim"][b]:.2f}', fontsize=7)
            if b == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
