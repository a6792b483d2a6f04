"""TFDS builders on tiny fixtures written in each real layout; array_record, no TensorFlow."""

import gzip
import json
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedjax_med.data import brats, mri, nih_metadata, sources, storage, tfds_io

HEADER = (
    'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,{sex},View Position,'
    'OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n'
)
# (image, labels, patient, view, sex)
NIH_ROWS = [
    ('00000001_000.png', 'Cardiomegaly', 1, 'PA', 'M'),
    ('00000001_001.png', 'Cardiomegaly|Emphysema', 1, 'PA', 'M'),
    ('00000002_000.png', 'No Finding', 2, 'AP', 'F'),
    ('00000003_000.png', 'Hernia', 3, 'PA', 'F'),
    ('00000004_000.png', 'Effusion|Mass|Nodule', 4, 'AP', 'M'),
    ('00000005_000.png', 'No Finding', 5, 'PA', 'F'),
    ('00000006_000.png', 'Pleural_Thickening', 6, 'PA', 'M'),
    ('00000007_000.png', 'Infiltration', 7, 'AP', 'F'),
    ('00000008_000.png', 'Pneumothorax', 8, 'PA', 'M'),  # file corrupt
    ('00000009_000.png', 'Edema', 9, 'PA', 'F'),  # file missing
]
TEST_IMAGES = {'00000002_000.png', '00000006_000.png', '00000007_000.png'}


def write_nih(root, *, nested=True, lists=True, sex_column='Patient Gender', gz=False):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (name, *_rest) in enumerate(NIH_ROWS):
        folder = root / (f'images_00{1 + i % 2}/images' if nested else 'images')
        folder.mkdir(parents=True, exist_ok=True)
        if name.startswith('00000009'):
            continue
        if name.startswith('00000008'):
            (folder / name).write_bytes(b'\x89PNG not really')
            continue
        pixels = rng.integers(0, 255, (40, 40), dtype=np.uint8)
        if i == 3:
            Image.fromarray(np.stack([pixels] * 4, -1), 'RGBA').save(folder / name)
        elif i == 4:
            Image.fromarray(pixels.astype(np.uint16) * 200).save(folder / name)
        else:
            Image.fromarray(pixels).save(folder / name)
    text = HEADER.format(sex=sex_column) + ''.join(
        f'{n},{lab},0,{p},{40 + p},{s},{v},2500,2048,0.171,0.171\n' for n, lab, p, v, s in NIH_ROWS
    )
    if gz:
        with gzip.open(root / 'Data_Entry_2017_v2020.csv.gz', 'wt') as f:
            f.write(text)
    else:
        (root / 'Data_Entry_2017.csv').write_text(text)
    if lists:
        names = [r[0] for r in NIH_ROWS]
        (root / 'test_list.txt').write_text('\n'.join(n for n in names if n in TEST_IMAGES))
        (root / 'train_val_list.txt').write_text(
            '\n'.join(n for n in names if n not in TEST_IMAGES)
        )
    return root


def test_nih_builder_official_split(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    builder = tfds_io.make_builder(
        'nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=16
    )
    tfds_io.ensure_built(builder, str(manual))
    assert builder.info.splits['train'].num_examples == 5  # 7 listed, minus corrupt + missing
    assert builder.info.splits['test'].num_examples == 3
    assert builder.info.metadata['official_split'] is True
    assert builder.info.metadata['skipped_train'] == 2
    train = tfds_io.read_split(builder, 'train')
    assert train['image'].shape == (5, 16, 16, 1) and train['image'].dtype == np.uint8
    by_name = {n: i for i, n in enumerate(train['image_index'])}
    label = train['label'][by_name['00000004_000.png']]
    names = [nih_metadata.CXR_LABELS[k] for k in np.flatnonzero(label)]
    assert names == ['Effusion', 'Mass', 'Nodule']
    assert train['patient_id'][by_name['00000004_000.png']] == 4
    assert train['view'][by_name['00000004_000.png']] == nih_metadata.VIEWS.index('AP')
    assert train['age'][by_name['00000003_000.png']] == 43
    assert 'tensorflow' not in sys.modules


def test_nih_builder_flat_layout_patient_sex_seeded_split(tmp_path):
    manual = write_nih(
        tmp_path / 'nih', nested=False, lists=False, sex_column='Patient Sex', gz=True
    )
    builder = tfds_io.make_builder('nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=8)
    tfds_io.ensure_built(builder, str(manual))
    assert builder.info.metadata['official_split'] is False
    train, test = tfds_io.read_split(builder, 'train'), tfds_io.read_split(builder, 'test')
    assert len(train['label']) + len(test['label']) == 8
    assert not set(train['patient_id']) & set(test['patient_id'])
    assert set(train['sex']) | set(test['sex']) == {0, 1}


def test_nih_missing_csv_or_images_is_one_clear_error(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    builder = tfds_io.make_builder('nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=8)
    with pytest.raises(FileNotFoundError, match='Data_Entry_2017'):
        tfds_io.ensure_built(builder, str(empty))
    (empty / 'Data_Entry_2017.csv').write_text(
        HEADER.format(sex='Patient Gender') + '00000001_000.png,Mass,0,1,40,M,PA,1,1,0.1,0.1\n'
    )
    with pytest.raises(FileNotFoundError, match='No PNG images'):
        tfds_io.ensure_built(builder, str(empty))
    with pytest.raises(FileNotFoundError, match='manual_dir'):
        tfds_io.ensure_built(builder, None)


def test_load_federated_nih_uses_official_test(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    cfg = ml_collections.ConfigDict(
        dict(
            name='nih_chestxray14',
            data_dir=str(tmp_path / 'tfds'),
            manual_dir=str(manual),
            resolution=16,
            num_train=0,
            num_test=0,
            num_clients=2,
            partition='iid',
            dirichlet_alpha=0.5,
            findings_per_client=2,
            quantity_sigma=1.0,
            natural_column='view',
            feature_skew=True,
            test_fraction=0.2,
        )
    )
    ds = sources.load_federated(cfg, seed=0)
    assert ds.task == 'chestxray14' and ds.info['official_split']
    assert sorted(ds.test['patient_id']) == [2, 6, 7]
    assert sum(len(d['label']) for d in ds.clients_train) == 5
    assert ds.test['image'].dtype == np.uint8 and ds.test['label'].dtype == np.uint8
    # The PNG pixels are decoded to [0, 1] for the acquisition shift (not shifted as 0..255 and
    # saturated), so the shifted images stay close to the stored ones.
    raw = sources.load_federated(ml_collections.ConfigDict(dict(cfg, feature_skew=False)), seed=0)
    shifted, stored = (storage.decode_images(d.test['image']) for d in (ds, raw))
    assert abs(shifted.mean() - stored.mean()) < 0.15 and (ds.test['image'] == 255).mean() < 0.2


# ---------------------------------------------------------------------------------------------
# BraTS
# ---------------------------------------------------------------------------------------------

SHAPE = (16, 16, 6)  # x, y, z in RAS+


def _case_volumes(seed):
    """Canonical (RAS+) modalities [4, X, Y, Z] with a brain ellipse, and a BraTS label map."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing='ij')
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.2) ** 2 < 1
    brain[:, :, 0] = False  # a slice without brain
    seg = np.zeros(SHAPE, np.uint8)
    seg[3:9, 4:10, 2:5] = 2
    seg[4:7, 5:8, 3:5] = 4
    seg[5, 6, 3] = 1
    seg &= np.where(brain, 255, 0).astype(np.uint8)
    mods = np.stack(
        [(rng.uniform(1, 2, SHAPE) + 3 * (seg > 0) * (m + 1)) * brain for m in range(4)]
    ).astype(np.float32)
    return mods, seg, brain


def _affine():
    return np.array([[1.0, 0, 0, -8], [0, 1.2, 0, -10], [0, 0, 2.5, 4], [0, 0, 0, 1]])


def _save_reoriented(data, path, codes=('P', 'L', 'S')):
    """Writes data (RAS+) in another voxel order with the matching affine: same anatomy."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(('R', 'A', 'S')), nib.orientations.axcodes2ornt(codes)
    )
    stored = nib.orientations.apply_orientation(data, transform)
    affine = _affine() @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
    nib.save(nib.Nifti1Image(stored, affine), str(path))
    assert nib.aff2axcodes(affine) == codes


def write_brats(root, prefix, ext, n=3):
    truth = {}
    for i in range(n):
        case = f'{prefix}{i:03d}' if prefix.startswith('BraTS20_') else f'{prefix}{i:05d}'
        folder = root / case
        folder.mkdir(parents=True)
        mods, seg, brain = _case_volumes(i)
        for m, name in enumerate(mri.MODALITIES):
            _save_reoriented(mods[m], folder / f'{case}_{name}{ext}')
        _save_reoriented(seg.astype(np.float32), folder / f'{case}_seg{ext}')
        truth[case] = (mods, seg, brain)
    # A case missing a modality, and one with mismatched shapes: both skipped and reported.
    bad = root / f'{prefix}missing'
    bad.mkdir()
    for name in ('flair', 't1', 't2', 'seg'):
        nib.save(
            nib.Nifti1Image(np.ones(SHAPE, np.float32), _affine()),
            str(bad / f'{prefix}missing_{name}{ext}'),
        )
    odd = root / f'{prefix}odd'
    odd.mkdir()
    for name in (*mri.MODALITIES, 'seg'):
        shape = (16, 16, 5) if name == 't2' else SHAPE
        nib.save(
            nib.Nifti1Image(np.ones(shape, np.float32), _affine()),
            str(odd / f'{prefix}odd_{name}{ext}'),
        )
    return truth


@pytest.mark.parametrize(
    'version,prefix,ext',
    [('brats2020', 'BraTS20_Training_', '.nii'), ('brats2021', 'BraTS2021_', '.nii.gz')],
)
def test_brats_builder_orientation_labels_zscore(tmp_path, version, prefix, ext):
    truth = write_brats(tmp_path / 'raw', prefix, ext)
    builder = tfds_io.make_builder(version, data_dir=str(tmp_path / 'tfds'), resolution=16)
    tfds_io.ensure_built(builder, str(tmp_path / 'raw'))
    assert len(builder.info.metadata['skipped_cases']) == 2
    data = tfds_io.read_split(builder, 'train')
    assert set(data['case_id']) == set(truth)
    assert len(data['label']) == 3 * 5  # slice z=0 has no brain
    for case, (_mods, seg, brain) in truth.items():
        rows = np.flatnonzero(data['case_id'] == case)
        by_z = {int(data['slice_index'][r]): r for r in rows}
        assert sorted(by_z) == [1, 2, 3, 4, 5]
        z = 3
        expected = mri.seg_to_regions(brats.to_display(seg[:, :, z]), 'brats')
        np.testing.assert_array_equal(data['label'][by_z[z]], expected)
        # Labels 0/1/2/4: WT = 1,2,4; TC = 1,4; ET = 4.
        assert data['label'][by_z[z]][..., 0].sum() == (seg[:, :, z] > 0).sum()
        assert data['label'][by_z[z]][..., 1].sum() == np.isin(seg[:, :, z], (1, 4)).sum()
        assert data['label'][by_z[z]][..., 2].sum() == (seg[:, :, z] == 4).sum()
        # Orientation: the stored volume was PLS; the slice must match the RAS truth.
        shown = brats.to_display(brain[:, :, z])
        image = data['image'][by_z[z]].astype(np.float32)
        np.testing.assert_array_equal(np.any(image != 0, -1), shown)
        # z-score inside the brain over the whole case.
        vals = np.concatenate(
            [
                data['image'][r].astype(np.float32)[
                    brats.to_display(brain[:, :, int(data['slice_index'][r])])
                ]
                for r in rows
            ]
        )
        np.testing.assert_allclose(vals.mean(0), 0, atol=0.02)
        np.testing.assert_allclose(vals.std(0), 1, atol=0.02)
        # Tumour brighter than brain in every modality (channel order kept).
        tumour = brats.to_display(seg[:, :, z] > 0)
        assert (image[tumour].mean(0) > image[shown & ~tumour].mean(0)).all()


def write_msd(root):
    """One MSD Task01 case (BRATS_001) in its 4-D layout, plus a listed case that is absent.

    Returns the BraTS-convention truth (mods, seg, brain) of `_case_volumes(0)`; the stored FLAIR
    is mods[0] (each modality k is stored scaled by k + 1, in a shuffled channel order).
    """
    root = root / 'Task01_BrainTumour'
    (root / 'imagesTr').mkdir(parents=True)
    (root / 'labelsTr').mkdir()
    # Deliberately not FLAIR, T1w, t1gd, T2w: the reader must follow dataset.json.
    modality = {'0': 'T2w', '1': 'FLAIR', '2': 't1gd', '3': 'T1w'}
    stored_channel_of = [1, 3, 2, 0]  # FLAIR, T1, T1ce, T2 -> stored channel
    mods, seg_brats, brain = _case_volumes(0)
    # BraTS labels -> MSD labels: 2 oedema -> 1, 1 core -> 2, 4 enhancing -> 3.
    seg = np.select([seg_brats == 2, seg_brats == 1, seg_brats == 4], [1, 2, 3], 0)
    stored = np.zeros((*SHAPE, 4), np.float32)
    for ours, ch in enumerate(stored_channel_of):
        stored[..., ch] = mods[ours] * (ours + 1)
    _save_reoriented(stored, root / 'imagesTr' / 'BRATS_001.nii.gz')
    _save_reoriented(seg.astype(np.float32), root / 'labelsTr' / 'BRATS_001.nii.gz')
    (root / 'dataset.json').write_text(
        json.dumps(
            {
                'modality': modality,
                'labels': {
                    '0': 'background',
                    '1': 'edema',
                    '2': 'non-enhancing tumor',
                    '3': 'enhancing tumour',
                },
                'training': [
                    {
                        'image': './imagesTr/BRATS_001.nii.gz',
                        'label': './labelsTr/BRATS_001.nii.gz',
                    },
                    {
                        'image': './imagesTr/BRATS_002.nii.gz',
                        'label': './labelsTr/BRATS_002.nii.gz',
                    },
                ],  # absent: skipped
            }
        )
    )
    return mods, seg_brats, brain


def test_msd_builder_channel_order_and_label_mapping(tmp_path):
    mods, seg_brats, brain = write_msd(tmp_path)
    builder = tfds_io.make_builder('msd_brain', data_dir=str(tmp_path / 'tfds'), resolution=16)
    tfds_io.ensure_built(builder, str(tmp_path))
    assert len(builder.info.metadata['skipped_cases']) == 1
    data = tfds_io.read_split(builder, 'train')
    row = int(np.flatnonzero(data['slice_index'] == 3)[0])
    # Same regions as the BraTS-convention truth.
    np.testing.assert_array_equal(
        data['label'][row], mri.seg_to_regions(brats.to_display(seg_brats[:, :, 3]), 'brats')
    )
    assert data['patient_id'][row] == 1
    # Channel 0 must be FLAIR: z-scored FLAIR of the truth equals it.
    flair = mods[0][None, ..., None]
    z = mri.zscore_in_mask(flair, brain[None])[0, :, :, 3, 0]
    np.testing.assert_allclose(
        data['image'][row][..., 0].astype(np.float32), brats.to_display(z), atol=2e-2
    )


def test_brats_missing_dir_is_clear_error(tmp_path):
    (tmp_path / 'raw').mkdir()
    (tmp_path / 'raw' / 'README.txt').write_text('not a case')
    builder = tfds_io.make_builder('brats2021', data_dir=str(tmp_path / 'tfds'), resolution=8)
    with pytest.raises(FileNotFoundError, match='No BraTS case folders'):
        tfds_io.ensure_built(builder, str(tmp_path / 'raw'))


# ---------------------------------------------------------------------------------------------
# Synthetic builders and the CLI
# ---------------------------------------------------------------------------------------------


def test_synthetic_via_tfds_matches_in_memory_path(tmp_path):
    base = dict(
        data_dir=str(tmp_path / 'tfds'),
        manual_dir='',
        resolution=16,
        num_train=80,
        num_test=20,
        num_clients=2,
        partition='iid',
        dirichlet_alpha=0.5,
        findings_per_client=2,
        quantity_sigma=1.0,
        natural_column='view',
        feature_skew=False,
        test_fraction=0.2,
        slices_per_case=4,
    )
    for name in ('synthetic_cxr', 'synthetic_brats'):
        mem = sources.load_federated(ml_collections.ConfigDict(dict(base, name=name)), seed=0)
        via = sources.load_federated(
            ml_collections.ConfigDict(dict(base, name=name, synthetic_via_tfds=True)), seed=0
        )
        assert sorted(mem.test['patient_id']) == sorted(via.test['patient_id'])
        within = 'slice_index' if name == 'synthetic_brats' else 'follow_up'
        order_m = np.lexsort([mem.test[within], mem.test['patient_id']])
        order_v = np.lexsort([via.test[within], via.test['patient_id']])
        tol = 1 / 255 if name == 'synthetic_cxr' else 1e-2  # PNG / float16 storage
        assert mem.test['image'].dtype == via.test['image'].dtype
        np.testing.assert_allclose(
            storage.decode_images(mem.test['image'][order_m]),
            storage.decode_images(via.test['image'][order_v]),
            atol=tol,
        )
        np.testing.assert_array_equal(mem.test['label'][order_m], via.test['label'][order_v])
    assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize(
    'name,resolution',
    [
        ('nih_chestxray14', 224),
        ('nih_chestxray14', 20),
        ('brats2021', 128),
        ('msd_brain', 40),
        ('synthetic_cxr', 64),
        ('synthetic_brats', 64),
    ],
)
def test_make_builder_predefined_and_custom_configs(tmp_path, name, resolution):
    num = 150 if name == 'synthetic_brats' else 2500
    builder = tfds_io.make_builder(
        name, data_dir=str(tmp_path), resolution=resolution, num_examples=num
    )
    assert builder.builder_config.resolution == resolution
    assert not tfds_io.is_built(builder)


def test_build_cli_prints_split_sizes(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'fedjax_med.data.build',
            '--dataset=nih_chestxray14',
            f'--manual_dir={manual}',
            f'--data_dir={tmp_path / "tfds"}',
            '--resolution=8',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'train: 5 examples' in out.stdout and 'test: 3 examples' in out.stdout
    assert 'skipped_train: 2' in out.stdout
    assert 'tensorflow imported: False' in out.stdout


def test_brats_case_numbers_are_stable():
    assert brats.case_number('BraTS20_Training_001') == 1
    assert brats.case_number('BRATS_484') == 484
    # Without digits: a fixed value in every process (not Python's per-process str hash).
    assert brats.case_number('UPENN_case') == 1844564927
