"""Evaluation metrics against hand-computed values, and what a split without examples gives."""

import math
import warnings

import numpy as np
import pytest

from fedjax_med import metrics
from fedjax_med.tasks import CXR_LABELS, TASKS


def test_auroc_hand_values():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly.
    assert metrics.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert metrics.auroc(np.array([0.2, 0.5, 0.5]), np.array([0, 0, 1])) == 0.75
    assert metrics.auroc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert math.isnan(metrics.auroc(np.array([0.3, 0.6]), np.array([1, 1])))


def test_multilabel_metrics_hand_values():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4], [0.3, 0.8]])
    labels = np.array([[1, 0], [0, 1], [0, 0], [1, 0]])
    out = metrics.multilabel_metrics(probs, labels, ('a', 'b'))
    # a: positives 0.9, 0.3 vs negatives 0.6, 0.1 -> 3/4. b: positive 0.7 vs 0.2, 0.4, 0.8 -> 2/3.
    assert out['auroc/a'] == pytest.approx(0.75)
    assert out['auroc/b'] == pytest.approx(2 / 3)
    assert out['mean_auroc'] == pytest.approx((0.75 + 2 / 3) / 2)
    assert out['auroc_labels'] == 2
    # A label without positives has no AUROC: the mean covers the other one, and says so.
    one = metrics.multilabel_metrics(
        probs, np.stack([labels[:, 0], 0 * labels[:, 1]], 1), ('a', 'b')
    )
    assert np.isnan(one['auroc/b']) and one['mean_auroc'] == pytest.approx(0.75)
    assert one['auroc_labels'] == 1
    # At 0.5: a predicts [1, 1, 0, 0] (2 of 4 right), b predicts [0, 1, 0, 1] (3 of 4 right).
    assert out['accuracy'] == pytest.approx(5 / 8)
    # F1: a has tp 1, 2 predicted, 2 true -> 0.5; b has tp 1, 2 predicted, 1 true -> 2/3.
    assert out['macro_f1'] == pytest.approx((0.5 + 2 / 3) / 2)
    # The same two under names that carry their threshold.
    assert out['accuracy_at_0.5'] == out['accuracy']
    assert out['macro_f1_at_0.5'] == out['macro_f1']


def test_dice_hand_values_and_absent_regions():
    out = metrics.dice_from_sums(
        np.array([3.0, 0.0, 0.0]),
        np.array([4.0, 2.0, 0.0]),
        np.array([5.0, 1.0, 0.0]),
        num_examples=7,
    )
    assert out['dice_wt'] == pytest.approx(6 / 9)
    assert out['dice_tc'] == 0.0
    assert out['dice_et'] == 1.0  # absent from prediction and truth
    assert out['mean_dice'] == pytest.approx((6 / 9 + 0.0 + 1.0) / 3)


@pytest.mark.parametrize('task', ['chestxray14', 'brats'])
def test_a_split_without_examples_has_no_metrics_and_no_warning(task):
    """A hospital with an empty test split gets NaN (left out of the means over hospitals), not
    a Dice of 1 for 'nothing predicted, nothing there', and numpy prints nothing."""
    if task == 'chestxray14':
        stats = {
            'probs': np.zeros((0, len(CXR_LABELS))),
            'labels': np.zeros((0, len(CXR_LABELS))),
            'mask': np.zeros(0),
            'loss': np.float32(0),
            'count': np.float32(0),
        }
    else:
        stats = {
            'intersection': np.zeros(3),
            'pred_sum': np.zeros(3),
            'target_sum': np.zeros(3),
            'loss': np.float32(0),
            'count': np.float32(0),
        }
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = TASKS[task].finalize(stats)
    assert out and all(math.isnan(v) for v in out.values()), out
