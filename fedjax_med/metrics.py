"""Evaluation metrics.

Device side, metrics are (sum, count) pairs or sums that add up over batches and hospitals
(Dice's intersection and volumes). Rank metrics (AUROC) need every score, so the chest X-ray
evaluation returns per-example probabilities and the host computes AUROC, accuracy and F1 from them
in numpy, exactly (ties counted as one half).
"""

import numpy as np

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
    two hospitals' mean AUROCs may cover different findings."""
    probs, labels = np.asarray(probs), np.asarray(labels) > 0.5
    if len(probs) == 0:
        return {**{f'auroc/{name}': float('nan') for name in names},
                **{key: float('nan') for key in ('mean_auroc', 'accuracy', 'macro_f1')},
                'auroc_labels': float('nan')}
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
    out['accuracy'] = float(np.mean(preds == labels))
    out['macro_f1'] = float(np.mean(f1s))
    return out


def dice_from_sums(intersection: np.ndarray, pred_sum: np.ndarray,
                   target_sum: np.ndarray, num_examples: int) -> dict[str, float]:
    """Dice per BraTS region from summed intersections and volumes, and their mean.

    Sums run over every pixel of the split (dataset-level Dice), so empty slices do not produce
    0/0. A region absent from both prediction and truth counts as Dice 1; a split without
    examples has no Dice (NaN), so it cannot count as a perfect one.
    """
    if num_examples == 0:
        return {**{f'dice_{name}': float('nan') for name in BRATS_REGIONS},
                'mean_dice': float('nan')}
    out = {}
    for r, name in enumerate(BRATS_REGIONS):
        denom = pred_sum[r] + target_sum[r]
        out[f'dice_{name}'] = float(2.0 * intersection[r] / denom) if denom > 0 else 1.0
    out['mean_dice'] = float(np.mean([out[f'dice_{n}'] for n in BRATS_REGIONS]))
    return out
