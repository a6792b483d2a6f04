"""The two tasks: per-example losses (the DP-SGD path needs them one example at a time),
device-side evaluation statistics, and the host-side metrics built from them.

A task is a small bundle of pure functions over `apply(params, images) -> logits`; the training
code never branches on the task name.

Metrics (keys under eval/ in metrics.jsonl; hospital/<name>/ rows carry the main metric only):

chestxray14 (main metric `mean_auroc`), from `finalize` on every split:
  auroc/<finding>, mean_auroc, auroc_labels   AUROC per finding, their mean over the findings with
                                              both classes in the split, how many that was
  accuracy, macro_f1                          mean per-finding accuracy and F1 at the fixed
                                              threshold 0.5 (also as accuracy_at_0.5,
                                              macro_f1_at_0.5)
  loss
and from `split_metrics` on the global test split only (`metrics.threshold_metrics`): the split
is cut by patient into a validation half and a test half, each finding's threshold maximises
Youden's J on the validation half, and on the test half: accuracy_at_val_threshold,
macro_f1_at_val_threshold, threshold_labels, threshold/<finding>, normal_vs_abnormal_accuracy
('No Finding' vs any finding, score = largest finding probability), abnormal_threshold,
normal_vs_abnormal_auroc (whole split), threshold_val_examples, threshold_test_examples.

brats (main metric `mean_dice`), from `finalize` on every split:
  dice_wt, dice_tc, dice_et, mean_dice        dataset-level Dice: intersections and volumes summed
                                              over every pixel (voxel) of the split, divided once
  loss
and from `split_metrics` on the global test split only, the BraTS challenge's per-case metrics
(`metrics.case_scores`): each test case's predictions are put back into its volume -- 2-D
slices stacked by 'slice_index', 3-D patches stitched at their 'patch_origin' -- and per case
and region (WT, TC, ET):
  case_dice_<region>, mean_case_dice          Dice per case (1 if prediction and truth are both
                                              empty, 0 if exactly one is), averaged over cases;
                                              mean_case_dice averages the three regions
  hd95_<region>, mean_hd95                    95th percentile of the pooled symmetric surface
                                              distances, in voxels of the stored grid (in-plane
                                              pixels after resizing, slices along the axial axis;
                                              the two need not be the same length in mm); 0 if
                                              both are empty, the diagonal of the case's volume in
                                              voxels if exactly one is (BraTS's 373.13 is the
                                              diagonal of its 240 x 240 x 155 grid of 1 mm
                                              voxels)
  num_cases
  case_voxel_coverage (3-D only)              mean over cases of the fraction of the volume's
                                              voxels covered by the case's test patches
In 3-D (data.patch_size > 0) the full volumes are not kept, only the patches cut from them
(data.patches_per_case per case, data.tumour_patch_fraction of them centred on tumour), so
the per-case metrics are over the voxels those patches cover: uncovered voxels count as
background in prediction and truth, and a tumour part outside every patch is not seen. They are
per-case metrics of the patches, not of whole volumes.

With `attack.mode='backdoor'` (chest X-ray only, fedjax_med/attacks.py) the evaluation adds
eval/backdoor_success: of the global test images without the target finding, the fraction
predicted to have it once the trigger is stamped on them (`attacks.backdoor_success`).

Cost: `split_metrics` runs on the host, once per evaluation round (once per hospital model in
local mode), and `config.eval_case_metrics=False` skips it. HD95 is two Euclidean distance
transforms per case and region over the bounding box of prediction and truth: milliseconds
for the synthetic volumes, tens of milliseconds for a 140 x 128 x 128 case predicted
near its tumour, and about a second per region (one CPU core) when the prediction is scattered
over the whole volume, as an untrained model's can be.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_med import metrics
from fedjax_med.data.nih_metadata import CXR_LABELS  # the 14 findings, in output order


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
    # logits -> per-example arrays [B, ...] that the global test evaluation also brings back to
    # the host for `split_metrics` (hospitals' own splits and training do not compute them)
    example_outputs: Callable[[jax.Array], dict] | None = None
    # (unbatched stats with the example outputs, host split: 'label' and metadata, rows in the
    # order evaluated) -> dict of scalar metrics that need whole cases or patients; computed on
    # the host at evaluation rounds, for the global test split
    split_metrics: Callable[[dict, dict], dict] | None = None


# ---- chest X-ray: 14 independent sigmoid outputs ------------------------------------------------


def _cxr_loss(logits, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


def _cxr_stats(logits, labels, mask):
    # Probabilities leave the device per example: AUROC needs every score.
    return {
        'probs': jax.nn.sigmoid(logits),
        'labels': labels,
        'mask': mask,
        'loss': (_cxr_loss(logits, labels) * mask).sum(),
        'count': mask.sum(),
    }


def _cxr_finalize(stats):
    keep = stats['mask'] > 0
    out = metrics.multilabel_metrics(stats['probs'][keep], stats['labels'][keep], CXR_LABELS)
    out['loss'] = float(stats['loss'] / stats['count']) if stats['count'] else float('nan')
    return out


def _cxr_split_metrics(stats, split):
    keep = stats['mask'] > 0
    probs, labels = stats['probs'][keep], stats['labels'][keep]
    if len(probs) != len(split['patient_id']):
        raise ValueError(
            f'{len(probs)} evaluated examples for a split of {len(split["patient_id"])}.'
        )
    return metrics.threshold_metrics(probs, labels, split['patient_id'], CXR_LABELS)


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
    return {
        'intersection': jnp.sum(pred * labels, axis=axes),
        'pred_sum': jnp.sum(pred, axis=axes),
        'target_sum': jnp.sum(labels, axis=axes),
        'loss': (_brats_loss(logits, labels) * mask).sum(),
        'count': mask.sum(),
    }


def _brats_finalize(stats):
    out = metrics.dice_from_sums(
        stats['intersection'], stats['pred_sum'], stats['target_sum'], int(stats['count'])
    )
    out['loss'] = float(stats['loss'] / stats['count']) if stats['count'] else float('nan')
    return out


def _brats_outputs(logits):
    # Binary predictions, 8 voxels a byte: what per-case metrics need, at 1/32 of float32 logits.
    pred = (logits > 0).reshape(logits.shape[0], -1)
    return {'pred_bits': jnp.packbits(pred, axis=-1)}


def _brats_split_metrics(stats, split):
    """Per-case Dice and HD95 (see the module docstring) from the packed predictions."""
    labels = split['label']
    n, shape = len(labels), labels.shape[1:]
    bits = stats['pred_bits']
    if len(bits) < n:
        raise ValueError(f'{len(bits)} evaluated examples for a split of {n}.')
    patches = labels.ndim == 5  # [n, P, P, P, 3]
    scores, coverage = [], []
    for rows in metrics.group_cases(
        split['case_id'] if 'case_id' in split else split['patient_id']
    ):
        pred = np.unpackbits(bits[rows], axis=-1, count=int(np.prod(shape))).reshape(
            len(rows), *shape
        )
        if patches:
            pred, truth, covered = metrics.stitch_patches(
                pred, labels[rows], split['patch_origin'][rows], split['volume_shape'][rows[0]]
            )
            coverage.append(float(covered.mean()))
        else:
            pred, truth = metrics.assemble_slices(
                pred, labels[rows], split['slice_index'][rows] if 'slice_index' in split else None
            )
        scores.append(metrics.case_scores(pred, truth))
    out = metrics.case_summary(scores)
    if patches:
        out['case_voxel_coverage'] = float(np.mean(coverage)) if coverage else float('nan')
    return out


TASKS = {
    'chestxray14': Task(
        'chestxray14',
        'mean_auroc',
        _cxr_loss,
        _cxr_stats,
        _cxr_finalize,
        split_metrics=_cxr_split_metrics,
    ),
    'brats': Task(
        'brats',
        'mean_dice',
        _brats_loss,
        _brats_stats,
        _brats_finalize,
        example_outputs=_brats_outputs,
        split_metrics=_brats_split_metrics,
    ),
}
