"""Evaluation metrics.

Device side, metrics are (sum, count) pairs or sums that add up over batches and hospitals
(Dice's intersection and volumes). Rank metrics (AUROC) need every score, so the chest X-ray
evaluation returns per-example probabilities and the host computes AUROC, accuracy and F1 from them
in numpy, exactly (ties counted as one half).

Metrics that need whole cases or patients are computed on the host, in numpy, at evaluation
rounds only, from per-example outputs and the split's metadata (`tasks.Task.split_metrics`):

- Chest X-ray, thresholds chosen on held-out data (`threshold_metrics`): the test split is cut by
  patient into a validation half and a test half (`validation_patients`); each finding's threshold
  maximises Youden's J on the validation half, and accuracy and F1 at those thresholds are
  measured on the test half. The same for normal ('No Finding') vs abnormal, scored by the
  largest finding probability.
- BraTS, the challenge's per-case metrics (`case_scores`, `case_summary`): Dice and HD95 per case
  and region on whole case volumes (2-D slices stacked back into their volume,
  `assemble_slices`; 3-D patches stitched into theirs, `stitch_patches`), averaged over cases.
  The dataset-level Dice of `dice_from_sums` (`mean_dice`) stays the main BraTS metric.
"""

import zlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

BRATS_REGIONS = ('wt', 'tc', 'et')


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of one label (Mann-Whitney U with mid-ranks). NaN if one class."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    order = np.argsort(scores, kind='mergesort')
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Mid-ranks: tied scores share the mean of the ranks they occupy.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, names) -> dict[str, float]:
    """Per-label AUROC, mean AUROC, mean per-label accuracy at 0.5 and macro F1 at 0.5; all NaN
    for a split without examples (e.g. a hospital whose test split is empty).

    AUROC is undefined for a label with no positive (or no negative) example in the split, so
    mean AUROC averages the labels that have both; `auroc_labels` says how many that was, since
    two hospitals' mean AUROCs may cover different findings.

    `accuracy` and `macro_f1` use the fixed threshold 0.5 on every finding (a finding's F1 is 0
    when it is neither predicted nor present); `accuracy_at_0.5` and `macro_f1_at_0.5` are the
    same values under names that say so. Thresholds chosen on validation data:
    `threshold_metrics`."""
    probs, labels = np.asarray(probs), np.asarray(labels) > 0.5
    if len(probs) == 0:
        return {
            **{f'auroc/{name}': float('nan') for name in names},
            **{
                key: float('nan')
                for key in (
                    'mean_auroc',
                    'accuracy',
                    'macro_f1',
                    'accuracy_at_0.5',
                    'macro_f1_at_0.5',
                )
            },
            'auroc_labels': float('nan'),
        }
    preds = probs >= 0.5
    out = {}
    aurocs, f1s = [], []
    for j, name in enumerate(names):
        a = auroc(probs[:, j], labels[:, j])
        out[f'auroc/{name}'] = a
        aurocs.append(a)
        tp = np.sum(preds[:, j] & labels[:, j])
        denom = preds[:, j].sum() + labels[:, j].sum()
        f1s.append(2.0 * tp / denom if denom > 0 else 0.0)
    valid = [a for a in aurocs if not np.isnan(a)]
    out['mean_auroc'] = float(np.mean(valid)) if valid else float('nan')
    out['auroc_labels'] = len(valid)
    out['accuracy'] = out['accuracy_at_0.5'] = float(np.mean(preds == labels))
    out['macro_f1'] = out['macro_f1_at_0.5'] = float(np.mean(f1s))
    return out


def dice_from_sums(
    intersection: np.ndarray, pred_sum: np.ndarray, target_sum: np.ndarray, num_examples: int
) -> dict[str, float]:
    """Dataset-level Dice per BraTS region from summed intersections and volumes
    (`dice_wt/tc/et`), and their mean (`mean_dice`, the BraTS task's main metric).

    Sums run over every pixel of the split (dataset-level Dice), so empty slices do not produce
    0/0; large tumours weigh more than small ones. This is not the BraTS challenge's Dice, which
    is computed per case and averaged over cases (`case_scores`, `case_summary`). A region absent
    from both prediction and truth counts as Dice 1; a split without examples has no Dice (NaN),
    so it cannot count as a perfect one.
    """
    if num_examples == 0:
        return {
            **{f'dice_{name}': float('nan') for name in BRATS_REGIONS},
            'mean_dice': float('nan'),
        }
    out = {}
    for r, name in enumerate(BRATS_REGIONS):
        denom = pred_sum[r] + target_sum[r]
        out[f'dice_{name}'] = float(2.0 * intersection[r] / denom) if denom > 0 else 1.0
    out['mean_dice'] = float(np.mean([out[f'dice_{n}'] for n in BRATS_REGIONS]))
    return out


# ---------------------------------------------------------------------------------------------
# Chest X-ray: thresholds chosen on a validation half of the test split
# ---------------------------------------------------------------------------------------------


def validation_patients(patient_ids: np.ndarray) -> np.ndarray:
    """Bool [n]: True for the examples whose patient is in the validation half.

    A patient is in the validation half when the CRC-32 of its id's decimal text (`str(id)`, e.g.
    b'1234') is even, otherwise in the test half. The rule depends on the id alone -- not on the
    run's seed or on which other patients the split holds -- so every image of a patient is on
    the same side, in every run; the halves are about equal in patients, not exactly.
    """
    ids = np.asarray(patient_ids).reshape(-1)
    unique, inverse = np.unique(ids, return_inverse=True)
    even = np.array([zlib.crc32(str(u).encode()) % 2 == 0 for u in unique.tolist()], bool)
    return even[inverse.reshape(-1)]


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t maximising Youden's J = TPR - FPR of the rule 'positive iff score >= t'.

    Candidates are the distinct scores; among thresholds with the same J the highest is taken
    (the fewest positive calls, like `argmax` over scikit-learn's decreasing ROC thresholds).
    J is compared exactly, as the integer TP * n_neg - FP * n_pos. NaN when the scores have no
    positive or no negative example (J is undefined)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    candidates = np.unique(scores)  # ascending
    tp = n_pos - np.searchsorted(np.sort(scores[labels]), candidates, side='left')
    fp = n_neg - np.searchsorted(np.sort(scores[~labels]), candidates, side='left')
    j = tp.astype(np.int64) * n_neg - fp.astype(np.int64) * n_pos
    return float(candidates[np.flatnonzero(j == j.max())[-1]])


def accuracy_f1_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """Accuracy and F1 of 'positive iff score >= threshold' (F1 0 when nothing is predicted or
    present, as in `multilabel_metrics`); NaN for no examples."""
    labels = np.asarray(labels).reshape(-1) > 0.5
    if not len(labels):
        return float('nan'), float('nan')
    preds = np.asarray(scores).reshape(-1) >= threshold
    tp = int(np.sum(preds & labels))
    denom = int(preds.sum() + labels.sum())
    return float(np.mean(preds == labels)), 2.0 * tp / denom if denom else 0.0


def threshold_metrics(
    probs: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """Accuracies at thresholds chosen on held-out patients (the chest X-ray `split_metrics`).

    The split is cut by patient (`validation_patients`) into a validation half and a test half.
    On the validation half each finding gets the threshold maximising Youden's J
    (`youden_threshold`); at those thresholds, on the test half:
      threshold/<finding>          the finding's threshold (NaN when the validation half has no
                                   positive or no negative for it: no threshold, left out below)
      accuracy_at_val_threshold    mean over the findings with a threshold of their accuracy
      macro_f1_at_val_threshold    mean over the same findings of their F1
      threshold_labels             how many findings that was
    Normal ('No Finding': no finding present) vs abnormal (any finding), scored by the largest
    of the 14 finding probabilities:
      abnormal_threshold           its Youden threshold on the validation half
      normal_vs_abnormal_accuracy  accuracy on the test half at that threshold
      normal_vs_abnormal_auroc     AUROC of that score on the whole split (like `mean_auroc`)
    and the halves' sizes in images, threshold_val_examples and threshold_test_examples.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels) > 0.5
    val = validation_patients(patient_ids) if len(probs) else np.zeros(0, bool)
    test = ~val
    out: dict[str, float] = {}
    accs, f1s = [], []
    for j, name in enumerate(names):
        t = youden_threshold(probs[val, j], labels[val, j])
        out[f'threshold/{name}'] = t
        if np.isnan(t) or not test.any():
            continue
        acc, f1 = accuracy_f1_at(probs[test, j], labels[test, j], t)
        accs.append(acc)
        f1s.append(f1)
    out['accuracy_at_val_threshold'] = float(np.mean(accs)) if accs else float('nan')
    out['macro_f1_at_val_threshold'] = float(np.mean(f1s)) if f1s else float('nan')
    out['threshold_labels'] = len(accs)
    abnormal = labels.any(axis=1)
    score = probs.max(axis=1) if len(probs) else np.zeros(0)
    t = youden_threshold(score[val], abnormal[val])
    out['abnormal_threshold'] = t
    out['normal_vs_abnormal_accuracy'] = (
        accuracy_f1_at(score[test], abnormal[test], t)[0] if not np.isnan(t) else float('nan')
    )
    out['normal_vs_abnormal_auroc'] = auroc(score, abnormal) if len(score) else float('nan')
    out['threshold_val_examples'] = int(val.sum())
    out['threshold_test_examples'] = int(test.sum())
    return out


# ---------------------------------------------------------------------------------------------
# BraTS: per-case Dice and HD95 on whole case volumes
# ---------------------------------------------------------------------------------------------


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a binary mask: those with a face neighbour outside it (the mask minus
    its erosion by the face-connected cross; voxels on the array's border are surface)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return tuple(box)


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    empty_distance: float,
    spacing: Sequence[float] | None = None,
) -> float:
    """95th percentile Hausdorff distance between two binary masks of the same shape.

    The distances from every surface voxel of `pred` to the nearest surface voxel of `truth` and
    from every surface voxel of `truth` to the nearest of `pred` are pooled, and their 95th
    percentile (numpy's linear interpolation) is returned: the definition of MedPy's
    `metric.binary.hd95` (the other common variant, the larger of the two directed 95th
    percentiles, as in DeepMind's surface-distance, is not this one). Distances are Euclidean,
    in voxels, or in the units of `spacing` (one voxel size per axis) when given.

    Empty masks (the BraTS convention): 0 when both are empty, `empty_distance` when exactly one
    is.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f'pred {pred.shape} and truth {truth.shape} differ in shape.')
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0
    if not has_pred or not has_truth:
        return float(empty_distance)
    # Both masks lie in this box; one voxel more on every side keeps the surfaces and distances
    # exactly those of the whole volume, at a fraction of the cost of transforming it all.
    box = _bounding_box(pred | truth, margin=1)
    pred, truth = pred[box], truth[box]
    pred_surface, truth_surface = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[truth_surface]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def case_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one case and region with the BraTS convention for empty masks: 1 when prediction
    and truth are both empty, 0 when exactly one is (what the formula gives anyway)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.sum(pred & truth)) / denom if denom else 1.0


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the diagonal of a volume of `shape` voxels: BraTS's 373.13 for 240 x 240 x 155
    at 1 mm."""
    sizes = np.asarray(shape, np.float64) * (1.0 if spacing is None else np.asarray(spacing))
    return float(np.sqrt(np.sum(sizes**2)))


def case_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    empty_distance: float | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Dice and HD95 of each BraTS region for one case.

    pred, truth: binary [*spatial, 3] (WT, TC, ET) of one whole case. `empty_distance` is the
    HD95 when exactly one of prediction and truth is empty (default: the diagonal of the case's
    volume, `volume_diagonal`, which for BraTS's 240 x 240 x 155 grid at 1 mm is the 373.13 the
    challenge uses). Returns 'dice_<region>' and 'hd95_<region>'.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if empty_distance is None:
        empty_distance = volume_diagonal(truth.shape[:-1], spacing)
    out = {}
    for r, name in enumerate(BRATS_REGIONS):
        out[f'dice_{name}'] = case_dice(pred[..., r], truth[..., r])
        out[f'hd95_{name}'] = hd95(
            pred[..., r], truth[..., r], empty_distance=empty_distance, spacing=spacing
        )
    return out


def case_summary(scores: Sequence[dict]) -> dict[str, float]:
    """Means over cases of `case_scores` results, as the BraTS challenge reports them:
    case_dice_<region> and hd95_<region> (means over cases), mean_case_dice and mean_hd95 (their
    means over WT, TC and ET) and num_cases; NaN (num_cases 0) without cases."""
    nan = float('nan')
    out = {}
    for metric, key, mean_key in (
        ('dice', 'case_dice', 'mean_case_dice'),
        ('hd95', 'hd95', 'mean_hd95'),
    ):
        for name in BRATS_REGIONS:
            out[f'{key}_{name}'] = (
                float(np.mean([s[f'{metric}_{name}'] for s in scores])) if scores else nan
            )
        out[mean_key] = (
            float(np.mean([out[f'{key}_{n}'] for n in BRATS_REGIONS])) if scores else nan
        )
    out['num_cases'] = len(scores)
    return out


def group_cases(case_ids: np.ndarray) -> list[np.ndarray]:
    """Row indices of each case (cases in sorted id order, rows in split order)."""
    ids = np.asarray(case_ids).reshape(-1)
    if not len(ids):
        return []
    _, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind='stable')
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def assemble_slices(
    pred: np.ndarray, truth: np.ndarray, slice_index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One case's 2-D slices [n, H, W, 3] stacked into volumes [Z, H, W, 3] (bool).

    Slice i goes to plane slice_index[i] - min(slice_index), so Z spans the case's slices from
    the first to the last present; planes in between that the split lacks (e.g. tumour-free
    slices thinned by data.empty_slice_stride) are background in prediction and truth. Without
    `slice_index` the slices are stacked in the order given.
    """
    n = len(pred)
    z = (
        np.arange(n)
        if slice_index is None
        else np.asarray(slice_index, np.int64) - int(np.min(slice_index))
    )
    if len(np.unique(z)) != n:
        raise ValueError('Two slices of one case have the same slice_index.')
    depth = int(z.max()) + 1 if n else 0
    pred_volume = np.zeros((depth, *pred.shape[1:]), bool)
    truth_volume = np.zeros((depth, *truth.shape[1:]), bool)
    pred_volume[z] = np.asarray(pred) > 0
    truth_volume[z] = np.asarray(truth) > 0
    return pred_volume, truth_volume


def stitch_patches(
    pred: np.ndarray, truth: np.ndarray, origins: np.ndarray, volume_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case's 3-D patches [n, P, P, P, 3] placed back into its volume [Z, H, W, 3].

    Each patch covers volume_shape-clipped voxels origin .. origin + P (the zero padding of a
    volume smaller than P is dropped). A voxel covered by several patches is predicted positive
    when at least half of them predict it (a tie counts as positive); the truth is the same in
    every patch. Voxels no patch covers are background in prediction and truth.

    Returns (pred volume, truth volume) as bool [Z, H, W, 3] and `covered`, bool [Z, H, W].
    """
    shape = tuple(int(s) for s in volume_shape)
    votes = np.zeros((*shape, pred.shape[-1]), np.int32)
    count = np.zeros(shape, np.int32)
    truth_volume = np.zeros((*shape, truth.shape[-1]), bool)
    for p, t, o in zip(pred, truth, np.asarray(origins, np.int64), strict=True):
        box = tuple(
            slice(int(a), min(int(a) + size, s))
            for a, size, s in zip(o, p.shape[:3], shape, strict=True)
        )
        cut = tuple(slice(0, b.stop - b.start) for b in box)
        votes[box] += p[cut] > 0
        count[box] += 1
        truth_volume[box] |= t[cut] > 0
    covered = count > 0
    pred_volume = (2 * votes >= count[..., None]) & covered[..., None]
    return pred_volume, truth_volume, covered
