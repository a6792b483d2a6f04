"""The two tasks: per-example losses (the DP-SGD path needs them one example at a time),
device-side evaluation statistics, and the host-side metrics built from them.

A task is a small bundle of pure functions over `apply(params, images) -> logits`; the training
code never branches on the task name.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_med import metrics

CXR_LABELS = ('Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
              'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis',
              'Pleural_Thickening', 'Hernia')


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    main_metric: str  # key under eval/ used for the console, early checks and reports
    # (logits [B, ...], labels [B, ...]) -> per-example loss [B]
    per_example_loss: Callable[[jax.Array, jax.Array], jax.Array]
    # (logits, labels, mask [B]) -> dict of arrays that are summed over batches
    eval_stats: Callable[[jax.Array, jax.Array, jax.Array], dict]
    # summed stats (numpy) -> dict of scalar metrics
    finalize: Callable[[dict], dict]


# ---- chest X-ray: 14 independent sigmoid outputs ------------------------------------------------

def _cxr_loss(logits, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


def _cxr_stats(logits, labels, mask):
    # Probabilities leave the device per example: AUROC needs every score.
    return {'probs': jax.nn.sigmoid(logits), 'labels': labels, 'mask': mask,
            'loss': (_cxr_loss(logits, labels) * mask).sum(), 'count': mask.sum()}


def _cxr_finalize(stats):
    keep = stats['mask'] > 0
    out = metrics.multilabel_metrics(stats['probs'][keep], stats['labels'][keep], CXR_LABELS)
    out['loss'] = float(stats['loss'] / stats['count']) if stats['count'] else float('nan')
    return out


# ---- BraTS: 3 nested regions, sigmoid per region, BCE + soft Dice (2-D slices or 3-D patches) --

def _brats_loss(logits, labels):
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim - 1))
    inter = jnp.sum(probs * labels, axis=axes)
    soft_dice = (2 * inter + 1.0) / (jnp.sum(probs, axis=axes) + jnp.sum(labels, axis=axes) + 1.0)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=(*axes, -1))
    return bce + jnp.mean(1.0 - soft_dice, axis=-1)


def _brats_stats(logits, labels, mask):
    # Pixels of 2-D slices [B, H, W, 3] or voxels of 3-D patches [B, D, H, W, 3].
    example_mask = mask.reshape((-1,) + (1,) * (logits.ndim - 1))
    pred = (logits > 0).astype(jnp.float32) * example_mask
    labels = labels * example_mask
    axes = tuple(range(logits.ndim - 1))
    return {'intersection': jnp.sum(pred * labels, axis=axes), 'pred_sum': jnp.sum(pred, axis=axes),
            'target_sum': jnp.sum(labels, axis=axes),
            'loss': (_brats_loss(logits, labels) * mask).sum(), 'count': mask.sum()}


def _brats_finalize(stats):
    out = metrics.dice_from_sums(stats['intersection'], stats['pred_sum'], stats['target_sum'],
                                 int(stats['count']))
    out['loss'] = float(stats['loss'] / stats['count']) if stats['count'] else float('nan')
    return out


TASKS = {
    'chestxray14': Task('chestxray14', 'mean_auroc', _cxr_loss, _cxr_stats, _cxr_finalize),
    'brats': Task('brats', 'mean_dice', _brats_loss, _brats_stats, _brats_finalize),
}
