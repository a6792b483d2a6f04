"""Per-case BraTS metrics (Dice and HD95 on case volumes rebuilt from slices or patches) and the
chest X-ray accuracies at thresholds chosen on a validation half, against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_med import metrics
from fedjax_med.tasks import TASKS

# ---------------------------------------------------------------------------------------------
# Dice and HD95 of one mask pair
# ---------------------------------------------------------------------------------------------


def test_case_dice_hand_values_and_empty_conventions():
    truth = np.zeros((4, 4, 4), bool)
    truth[0:2, 0:2, 0:2] = True  # 8 voxels
    pred = np.zeros_like(truth)
    pred[1:3, 0:2, 0:2] = True  # the same cube one voxel further: 4 shared
    assert metrics.case_dice(pred, truth) == 0.5
    empty = np.zeros_like(truth)
    assert metrics.case_dice(empty, empty) == 1.0  # nothing there, nothing predicted
    assert metrics.case_dice(pred, empty) == 0.0  # tumour predicted in a tumour-free case
    assert metrics.case_dice(empty, truth) == 0.0  # tumour missed


def test_hd95_hand_values():
    # Two full planes 3 slices apart: every surface voxel is exactly 3 from the other surface.
    truth = np.zeros((10, 4, 4), bool)
    pred = np.zeros_like(truth)
    truth[2], pred[5] = True, True
    assert metrics.hd95(pred, truth, empty_distance=99.0) == 3.0
    # In the units of the voxel size: slices 2 mm apart.
    assert metrics.hd95(pred, truth, empty_distance=99.0, spacing=(2.0, 1.0, 1.0)) == 6.0
    # Two voxels: the distance between them, 5 (a 3-4-5 triangle).
    a, b = np.zeros((6, 6, 2), bool), np.zeros((6, 6, 2), bool)
    a[0, 0, 0], b[3, 4, 0] = True, True
    assert metrics.hd95(a, b, empty_distance=99.0) == 5.0
    assert metrics.hd95(truth, truth, empty_distance=99.0) == 0.0


def test_hd95_pools_both_directions_and_ignores_a_small_outlier():
    # Pooled, not the larger directed percentile: truth is a line x = 0..9 (every voxel of a
    # 1 x 1 x 20 array is surface), pred the voxel x = 19. Distances: pred -> truth [10],
    # truth -> pred [19, 18, ..., 10]. Pooled and sorted: 10, 10, 11, ..., 19; the 95th
    # percentile sits at 0.95 * 10 = 9.5 -> (18 + 19) / 2. (The larger directed one would be
    # 18.55.)
    truth = np.zeros((1, 1, 20), bool)
    truth[0, 0, :10] = True
    pred = np.zeros_like(truth)
    pred[0, 0, 19] = True
    assert metrics.hd95(pred, truth, empty_distance=99.0) == pytest.approx(18.5, abs=1e-12)
    # A 3^3 cube (26 surface voxels) predicted exactly plus one stray voxel 7 from its face:
    # 53 pooled distances, 52 of them 0, so HD95 is 0 (the Hausdorff distance would be 7).
    cube = np.zeros((12, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    stray = cube.copy()
    stray[10, 2, 2] = True
    assert metrics.hd95(stray, cube, empty_distance=99.0) == 0.0


def test_hd95_empty_conventions_and_the_brats_diagonal():
    empty = np.zeros((4, 4, 2), bool)
    some = empty.copy()
    some[1, 1, 1] = True
    assert metrics.hd95(empty, empty, empty_distance=50.0) == 0.0
    assert metrics.hd95(some, empty, empty_distance=50.0) == 50.0
    assert metrics.hd95(empty, some, empty_distance=50.0) == 50.0
    # The default for a case: the diagonal of its volume, sqrt(4^2 + 4^2 + 2^2) = 6 voxels.
    regions = np.zeros((4, 4, 2, 3), bool)
    regions[1, 1, 1, 0] = True
    scores = metrics.case_scores(regions, np.zeros_like(regions))
    assert scores == {
        'dice_wt': 0.0,
        'hd95_wt': 6.0,
        'dice_tc': 1.0,
        'hd95_tc': 0.0,
        'dice_et': 1.0,
        'hd95_et': 0.0,
    }
    assert (
        metrics.case_scores(regions, np.zeros_like(regions), empty_distance=373.13)['hd95_wt']
        == 373.13
    )
    assert round(metrics.volume_diagonal((240, 240, 155)), 2) == 373.13


def _surface_by_neighbours(mask):
    """Surface voxels found by looking at the six face neighbours (outside the array = empty)."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis)[tuple(slice(1, -1) for _ in mask.shape)]
    return mask & ~inner


def _brute_force_hd95(pred, truth):
    p = np.argwhere(_surface_by_neighbours(pred)).astype(float)
    t = np.argwhere(_surface_by_neighbours(truth)).astype(float)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


@pytest.mark.parametrize('seed', range(6))
def test_hd95_equals_brute_force_surface_distances(seed):
    """Random blobs, some touching the array's border: the cropped distance transforms give the
    same HD95 as all pairwise distances between the two surfaces."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    def blob():
        field = ndimage.gaussian_filter(rng.standard_normal((9, 11, 10)), 1.5)
        return field > np.quantile(field, rng.uniform(0.6, 0.95))

    pred, truth = blob(), blob()
    assert metrics.hd95(pred, truth, empty_distance=99.0) == pytest.approx(
        _brute_force_hd95(pred, truth), abs=1e-9
    )


# ---------------------------------------------------------------------------------------------
# Case volumes from slices and patches
# ---------------------------------------------------------------------------------------------


def test_group_cases_and_assemble_slices():
    groups = metrics.group_cases(np.array([3, 1, 3, 2, 1]))
    assert [g.tolist() for g in groups] == [[1, 4], [3], [0, 2]]
    assert [g.tolist() for g in metrics.group_cases(np.array(['b', 'a', 'b']))] == [[1], [0, 2]]
    slices = np.zeros((3, 2, 2, 3), np.uint8)
    slices[0, 0, 0, 0] = 1  # slice_index 7
    slices[1, 1, 1, 1] = 1  # slice_index 5
    slices[2, 0, 1, 2] = 1  # slice_index 4
    pred, truth = metrics.assemble_slices(slices, slices, np.array([7, 5, 4]))
    assert pred.shape == (4, 2, 2, 3) and pred.dtype == bool
    np.testing.assert_array_equal(np.argwhere(pred), [[0, 0, 1, 2], [1, 1, 1, 1], [3, 0, 0, 0]])
    assert not pred[2].any()  # slice 6 is not in the split: background
    np.testing.assert_array_equal(pred, truth)
    unordered, _ = metrics.assemble_slices(slices, slices)  # no slice_index: as given
    np.testing.assert_array_equal(unordered, slices > 0)
    with pytest.raises(ValueError, match='same slice_index'):
        metrics.assemble_slices(slices, slices, np.array([1, 1, 2]))


def test_stitch_patches_votes_covers_and_clips():
    pred = np.zeros((3, 2, 2, 2, 3), np.uint8)
    truth = np.zeros_like(pred)
    pred[0, ..., 0] = 1  # patch at z 0..1 says WT everywhere
    truth[0, 1, 0, 0, 0] = truth[1, 0, 0, 0, 0] = 1  # the same voxel (1, 0, 0) in both patches
    pred[2, ..., 0] = 1  # patch at (3, 3, 3): only its first voxel is inside
    origins = np.array([[0, 0, 0], [1, 0, 0], [3, 3, 3]])
    p, t, covered = metrics.stitch_patches(pred, truth, origins, (4, 4, 4))
    assert p.shape == t.shape == (4, 4, 4, 3) and covered.shape == (4, 4, 4)
    assert covered.sum() == 3 * 4 + 1
    expected = np.zeros((4, 4, 4), bool)
    expected[0:2, 0:2, 0:2] = True  # z = 0: 1 of 1 votes; z = 1: 1 of 2, a tie
    expected[3, 3, 3] = True
    np.testing.assert_array_equal(p[..., 0], expected)
    assert not p[..., 1:].any()
    np.testing.assert_array_equal(np.argwhere(t), [[1, 0, 0, 0]])
    # 9 voxels predicted, 1 true, 1 shared.
    assert metrics.case_dice(p[..., 0], t[..., 0]) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# The BraTS task: packed predictions -> per-case summary
# ---------------------------------------------------------------------------------------------


def _packed(pred, padding=2):
    """The task's device-side packing of binary predictions, plus padding rows."""
    logits = jnp.where(jnp.asarray(pred) > 0, 1.0, -1.0)
    bits = np.asarray(TASKS['brats'].example_outputs(logits)['pred_bits'])
    return {'pred_bits': np.concatenate([bits, np.zeros((padding, bits.shape[1]), bits.dtype)])}


def test_brats_split_metrics_on_slices_hand_values():
    # Case 3: two slices, WT a 2 x 2 square on both (predicted exactly), TC the square on slice 0
    # only (missed), ET absent (and not predicted). Case 7: three tumour-free slices, one voxel
    # of WT predicted on slice 1. Rows are interleaved and out of slice order.
    case = np.array([7, 3, 7, 3, 7])
    slice_index = np.array([2, 1, 0, 0, 1])
    label = np.zeros((5, 4, 4, 3), np.uint8)
    pred = np.zeros_like(label)
    label[[1, 3], 0:2, 0:2, 0] = 1
    label[3, 0:2, 0:2, 1] = 1
    pred[[1, 3], 0:2, 0:2, 0] = 1
    pred[4, 2, 2, 0] = 1
    split = {'label': label, 'case_id': case, 'patient_id': case, 'slice_index': slice_index}
    out = TASKS['brats'].split_metrics(_packed(pred), split)
    # Case 3: WT 1 / 0, TC 0 / diagonal of (2, 4, 4) = 6, ET 1 / 0.
    # Case 7: WT 0 / diagonal of (3, 4, 4) = sqrt(41), TC 1 / 0, ET 1 / 0.
    assert out == pytest.approx(
        {
            'case_dice_wt': 0.5,
            'case_dice_tc': 0.5,
            'case_dice_et': 1.0,
            'mean_case_dice': 2 / 3,
            'hd95_wt': math.sqrt(41) / 2,
            'hd95_tc': 3.0,
            'hd95_et': 0.0,
            'mean_hd95': (math.sqrt(41) / 2 + 3.0) / 3,
            'num_cases': 2,
        },
        abs=1e-12,
    )
    # The dataset-level Dice of the same predictions is another number: WT 16/17, TC 0, ET 1.
    inter, p, t = ((pred & label).sum((0, 1, 2)), pred.sum((0, 1, 2)), label.sum((0, 1, 2)))
    assert metrics.dice_from_sums(inter, p, t, 5)['mean_dice'] == pytest.approx(
        (16 / 17 + 0 + 1) / 3
    )


def test_brats_split_metrics_on_patches():
    # One case of a 4^3 volume seen through two 2^3 patches; WT predicted exactly where true,
    # ET predicted in a tumour-free region.
    label = np.zeros((2, 2, 2, 2, 3), np.uint8)
    label[0, :, :, :, 0] = 1
    pred = label.copy()
    pred[1, 0, 0, 0, 2] = 1
    split = {
        'label': label,
        'case_id': np.array([5, 5]),
        'patient_id': np.array([5, 5]),
        'patch_origin': np.array([[0, 0, 0], [2, 2, 2]]),
        'volume_shape': np.array([[4, 4, 4], [4, 4, 4]]),
    }
    out = TASKS['brats'].split_metrics(_packed(pred, padding=1), split)
    assert out['num_cases'] == 1 and out['case_voxel_coverage'] == 16 / 64
    assert (out['case_dice_wt'], out['case_dice_tc'], out['case_dice_et']) == (1.0, 1.0, 0.0)
    assert (out['hd95_wt'], out['hd95_tc']) == (0.0, 0.0)
    assert out['hd95_et'] == pytest.approx(math.sqrt(48))  # the diagonal of the 4^3 volume


def test_case_summary_without_cases_is_nan():
    out = metrics.case_summary([])
    assert out.pop('num_cases') == 0 and all(math.isnan(v) for v in out.values())


# ---------------------------------------------------------------------------------------------
# Chest X-ray: thresholds from a validation half
# ---------------------------------------------------------------------------------------------


def test_validation_patients_by_crc32_of_the_id():
    # crc32 of b'4', b'5', b'6', b'7' is even; of b'1', b'2', b'3', b'8' odd.
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 8, 4, 1])
    assert metrics.validation_patients(ids).tolist() == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
        False,
        True,
        False,
    ]
    assert metrics.validation_patients(np.array(['7'])).tolist() == [True]  # same text, same side


def test_youden_threshold_hand_values():
    # Thresholds 0.1, 0.35, 0.4, 0.8 give J = 0, 0.5, 0, 0.5: the higher of the tied two.
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert metrics.youden_threshold(scores, labels) == 0.8
    assert metrics.youden_threshold(np.array([0.2, 0.6, 0.7, 0.9]), np.array([0, 0, 1, 1])) == 0.7
    assert math.isnan(metrics.youden_threshold(scores, np.zeros(4)))
    assert math.isnan(metrics.youden_threshold(scores, np.ones(4)))


def _threshold_example():
    # Validation half: patients 4, 5, 6, 7; test half: patients 1 (two images), 2, 8, 3.
    patients = np.array([4, 5, 6, 7, 1, 1, 2, 8, 3])
    probs = np.array(
        [
            # a     b     c
            [0.2, 0.3, 0.0],  # validation
            [0.6, 0.1, 0.0],
            [0.7, 0.5, 0.0],
            [0.9, 0.4, 0.0],
            [0.75, 0.3, 0.0],  # test
            [0.65, 0.2, 0.0],
            [0.8, 0.9, 0.0],
            [0.1, 0.35, 0.0],
            [0.05, 0.1, 0.0],
        ]
    )
    labels = np.array(
        [
            [0, 1, 0],
            [0, 0, 0],
            [1, 0, 0],
            [1, 0, 0],
            [1, 0, 0],
            [1, 0, 1],
            [0, 1, 0],
            [0, 1, 0],
            [0, 0, 0],
        ]
    )
    return probs, labels, patients


def test_threshold_metrics_hand_values():
    probs, labels, patients = _threshold_example()
    out = metrics.threshold_metrics(probs, labels, patients, ('a', 'b', 'c'))
    # Validation: a's J is 0, 0.5, 1, 0.5 at 0.2, 0.6, 0.7, 0.9 -> 0.7; b's is 0, 1/3, -2/3,
    # -1/3 at 0.1, 0.3, 0.4, 0.5 -> 0.3; c has no positive there -> no threshold.
    assert out['threshold/a'] == 0.7 and out['threshold/b'] == 0.3
    assert math.isnan(out['threshold/c']) and out['threshold_labels'] == 2
    # Test half: a predicts 1 0 1 0 0 for truth 1 1 0 0 0 (3/5 right, F1 2*1/4); b predicts
    # 1 0 1 1 0 for 0 0 1 1 0 (4/5 right, F1 2*2/5).
    assert out['accuracy_at_val_threshold'] == pytest.approx((0.6 + 0.8) / 2)
    assert out['macro_f1_at_val_threshold'] == pytest.approx((0.5 + 0.8) / 2)
    # Normal vs abnormal, score = max probability. Validation: 0.3, 0.6, 0.7, 0.9 for abnormal
    # 1, 0, 1, 1 -> J * 3 = 0, -1, 2, 1 -> 0.7. Test: 0.75, 0.65, 0.9, 0.35, 0.1 for
    # 1, 1, 1, 1, 0 -> predicted 1, 0, 1, 0, 0: 3/5 right.
    assert out['abnormal_threshold'] == 0.7
    assert out['normal_vs_abnormal_accuracy'] == pytest.approx(0.6)
    # AUROC on the whole split: negatives 0.6 and 0.1 against 7 positives, 12 of 14 pairs.
    assert out['normal_vs_abnormal_auroc'] == pytest.approx(6 / 7)
    assert (out['threshold_val_examples'], out['threshold_test_examples']) == (4, 5)


def test_cxr_split_metrics_drop_the_padding_and_an_empty_split_is_nan():
    probs, labels, patients = _threshold_example()
    names = ('a', 'b', 'c')
    stats = {
        'probs': np.concatenate([probs, np.ones((3, 3))]),
        'labels': np.concatenate([labels, np.ones((3, 3))]),
        'mask': np.r_[np.ones(9), np.zeros(3)],
    }
    from fedjax_med import tasks

    expected = metrics.threshold_metrics(probs, labels, patients, names)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, 'CXR_LABELS', names)
        got = TASKS['chestxray14'].split_metrics(stats, {'patient_id': patients})
    np.testing.assert_equal(got, expected)
    empty = metrics.threshold_metrics(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), names)
    counts = {
        k: empty.pop(k)
        for k in ('threshold_labels', 'threshold_val_examples', 'threshold_test_examples')
    }
    assert counts == {
        'threshold_labels': 0,
        'threshold_val_examples': 0,
        'threshold_test_examples': 0,
    }
    assert all(math.isnan(v) for v in empty.values())


def test_a_run_without_case_metrics_logs_the_dataset_level_ones_only(tmp_path):
    from configs import brats
    from fedjax_med import train

    c = brats.get_config('smoke')
    c.num_rounds, c.eval_case_metrics = 1, False
    summary = train.run(c, str(tmp_path / 'run'))
    assert 0.0 <= summary['eval/mean_dice'] <= 1.0 and 'eval/own_mean_dice' in summary
    assert not any(
        k.startswith(('eval/case_', 'eval/hd95', 'eval/mean_case', 'eval/num_cases'))
        for k in summary
    )
