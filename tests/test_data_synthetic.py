"""Synthetic twins: shapes, value ranges, determinism, and that findings change the image."""

import numpy as np

from fedjax_med.data import mri, nih_metadata, synthetic


def test_cxr_shapes_ranges_and_determinism():
    a = synthetic.synthetic_cxr(24, 32, seed=1)
    b = synthetic.synthetic_cxr(24, 32, seed=1)
    c = synthetic.synthetic_cxr(24, 32, seed=2)
    assert a['image'].shape == (24, 32, 32, 1) and a['image'].dtype == np.float32
    assert a['label'].shape == (24, 14) and a['label'].dtype == np.float32
    assert 0.0 <= a['image'].min() and a['image'].max() <= 1.0
    for key in ('patient_id', 'view', 'age', 'sex'):
        assert a[key].shape == (24,)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a['image'], c['image'])


def test_cxr_metadata_comes_from_real_table_patientwise():
    rows = synthetic.sample_cxr_metadata(400, seed=0)
    table = nih_metadata.load_metadata_table()
    assert len(rows['label']) == 400
    assert set(rows['patient_id']) <= set(table['patient_id'])
    # whole patients, at most 4 images each, contiguous
    _, counts = np.unique(rows['patient_id'], return_counts=True)
    assert counts.max() <= 4
    changes = np.count_nonzero(np.diff(rows['patient_id']))
    assert changes == len(counts) - 1


def _render(labels, view=0):
    n = len(labels)
    rows = {
        'label': labels.astype(np.float32),
        'patient_id': np.arange(n),
        'view': np.full(n, view),
        'age': np.full(n, 50),
        'sex': np.zeros(n, np.int64),
    }
    return synthetic.synthetic_cxr(n, 48, seed=0, metadata_rows=rows)['image'][..., 0]


def test_each_finding_changes_the_image():
    n = 64
    base = _render(np.zeros((n, 14)))
    for k, name in enumerate(nih_metadata.CXR_LABELS):
        labels = np.zeros((n, 14))
        labels[:, k] = 1
        # Findings are local: the largest change in each image, averaged over images.
        diff = np.abs(_render(labels) - base).max(axis=(1, 2)).mean()
        assert diff > 0.05, name


def test_cardiomegaly_brightens_the_lower_middle():
    n = 64
    labels = np.zeros((n, 14))
    labels[:, nih_metadata.CXR_LABELS.index('Cardiomegaly')] = 1
    region = (slice(24, 40), slice(30, 44))
    assert (
        _render(labels)[:, region[0], region[1]].mean()
        > _render(np.zeros((n, 14)))[:, region[0], region[1]].mean() + 0.01
    )


def test_brats_shapes_regions_and_determinism():
    a = synthetic.synthetic_brats(3, 32, 8, seed=0)
    b = synthetic.synthetic_brats(3, 32, 8, seed=0)
    assert a['image'].shape == (24, 32, 32, 4) and a['label'].shape == (24, 32, 32, 3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    wt, tc, et = a['label'][..., 0], a['label'][..., 1], a['label'][..., 2]
    assert (tc <= wt).all() and (et <= tc).all()  # nested regions
    assert a['has_tumor'].min() == 0 and a['has_tumor'].max() == 1  # some slices tumour-free
    np.testing.assert_array_equal(a['case_id'], np.repeat(np.arange(3), 8))
    np.testing.assert_array_equal(a['slice_index'], np.tile(np.arange(8), 3))
    head = np.any(a['image'] != 0, axis=-1)
    assert (a['label'][..., 0][~head] == 0).all()


def test_brats_modality_contrast():
    d = synthetic.synthetic_brats(6, 32, 8, seed=1)
    img, lab = d['image'], d['label']
    oedema = (lab[..., 0] > 0) & (lab[..., 1] == 0)
    enhancing = lab[..., 2] > 0
    brain = np.any(img != 0, axis=-1) & (lab[..., 0] == 0)
    flair, t1ce, t2 = img[..., 0], img[..., 2], img[..., 3]
    assert flair[oedema].mean() > flair[brain].mean() + 0.5
    assert t2[oedema].mean() > t2[brain].mean() + 0.3
    assert t1ce[enhancing].mean() > t1ce[brain].mean() + 0.5


def test_region_mapping_per_version():
    seg = np.array([0, 1, 2, 3, 4])
    brats = mri.seg_to_regions(seg, 'brats')
    np.testing.assert_array_equal(brats[:, 0], [0, 1, 1, 0, 1])  # WT = 1, 2, 4
    np.testing.assert_array_equal(brats[:, 1], [0, 1, 0, 0, 1])  # TC = 1, 4
    np.testing.assert_array_equal(brats[:, 2], [0, 0, 0, 0, 1])  # ET = 4
    msd = mri.seg_to_regions(seg, 'msd')
    np.testing.assert_array_equal(msd[:, 0], [0, 1, 1, 1, 0])  # WT = 1, 2, 3
    np.testing.assert_array_equal(msd[:, 1], [0, 0, 1, 1, 0])  # TC = 2, 3
    np.testing.assert_array_equal(msd[:, 2], [0, 0, 0, 1, 0])  # ET = 3
