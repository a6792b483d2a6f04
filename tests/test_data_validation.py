"""The builders validate every volume, image and CSV row: faulty inputs in the real on-disk layouts
are skipped with a counted reason naming the file, or stop the build with one DataError line, and
no NaN or infinite value reaches a split."""

import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedjax_med.data import DataError, brats, nih_metadata, tfds_io
from tests import test_data_builders as fixtures
from tests.test_data_builders import HEADER, NIH_ROWS, SHAPE, write_brats, write_msd, write_nih

_affine, _case_volumes = fixtures._affine, fixtures._case_volumes

# ---------------------------------------------------------------------------------------------
# BraTS
# ---------------------------------------------------------------------------------------------

PREFIX, EXT = 'BraTS2021_', '.nii.gz'
VOXELS = int(np.prod(SHAPE))


def _write_case(root, case, mods, seg, seg_dtype=np.float32):
    folder = root / case
    folder.mkdir()
    for m, name in enumerate(('flair', 't1', 't1ce', 't2')):
        nib.save(nib.Nifti1Image(mods[m], _affine()), str(folder / f'{case}_{name}{EXT}'))
    nib.save(nib.Nifti1Image(seg.astype(seg_dtype), _affine()), str(folder / f'{case}_seg{EXT}'))
    return folder


def write_faulty_brats(root):
    """Two good cases, the missing-modality and odd-shape cases of `write_brats`, and one case per
    fault. Returns {case: the exact skipped_cases entry}."""
    write_brats(root, PREFIX, EXT, n=2)
    mods, seg, brain = _case_volumes(5)
    expected = {
        f'{PREFIX}missing': f'missing file: no t1ce file in {root / f"{PREFIX}missing"} '
        f'(expected {PREFIX}missing_t1ce.nii[.gz])',
        f'{PREFIX}odd': f'unexpected shape: modality shapes differ in {root / f"{PREFIX}odd"}: '
        'flair (16, 16, 6), t1 (16, 16, 6), t1ce (16, 16, 6), t2 (16, 16, 5)',
    }
    nan = mods.copy()
    nan[0][np.nonzero(brain)[0][:3], np.nonzero(brain)[1][:3], np.nonzero(brain)[2][:3]] = np.nan
    folder = _write_case(root, f'{PREFIX}00010', nan, seg)
    expected[f'{PREFIX}00010'] = (
        f'non-finite values: flair {folder}/{PREFIX}00010_flair{EXT} '
        f'has 3 NaN and 0 infinite of {VOXELS} voxels'
    )
    inf = mods.copy()
    inf[1][8, 8, 3], inf[1][8, 9, 3], inf[1][0, 0, 0] = np.inf, np.inf, -np.inf
    folder = _write_case(root, f'{PREFIX}00011', inf, seg)
    expected[f'{PREFIX}00011'] = (
        f'non-finite values: t1 {folder}/{PREFIX}00011_t1{EXT} has 0 '
        f'NaN and 3 infinite of {VOXELS} voxels'
    )
    folder = _write_case(root, f'{PREFIX}00012', mods, seg)
    t2 = folder / f'{PREFIX}00012_t2{EXT}'
    t2.write_bytes(t2.read_bytes()[: t2.stat().st_size // 2])  # an interrupted copy
    expected[f'{PREFIX}00012'] = (
        f'unreadable file: t2 {t2} cannot be read (EOFError: '
        'Compressed file ended before the end-of-stream marker was '
        'reached)'
    )
    folder = _write_case(root, f'{PREFIX}00013', np.zeros_like(mods), np.zeros_like(seg))
    expected[f'{PREFIX}00013'] = (
        f'all-zero case: every modality in {folder} is 0 in every voxel (no brain)'
    )
    constant = mods.copy()
    constant[2] = 0.0  # a T1ce that failed to export: zeros in a case with brain
    folder = _write_case(root, f'{PREFIX}00014', constant, seg)
    expected[f'{PREFIX}00014'] = (
        f'constant modality: t1ce {folder}/{PREFIX}00014_t1ce{EXT} is '
        f'0 in all {int(brain.sum())} brain voxels (no contrast)'
    )
    folder = _write_case(root, f'{PREFIX}00015', mods, seg, seg_dtype=np.complex64)
    expected[f'{PREFIX}00015'] = (
        f'unexpected dtype: segmentation {folder}/{PREFIX}00015_seg'
        f'{EXT} has voxels of dtype complex64; expected integer or '
        'floating-point intensities'
    )
    return expected


BRATS_COUNTS = {
    'non-finite values': 2,
    'all-zero case': 1,
    'constant modality': 1,
    'missing file': 1,
    'unexpected dtype': 1,
    'unexpected shape': 1,
    'unreadable file': 1,
}


@pytest.mark.parametrize('volumes', [False, True])
def test_brats_builder_skips_each_faulty_case_with_its_reason_and_file(
    tmp_path, volumes, capsys, caplog
):
    raw = tmp_path / 'raw'
    expected = write_faulty_brats(raw)
    builder = tfds_io.make_builder(
        'brats2021', data_dir=str(tmp_path / 'tfds'), resolution=16, volumes=volumes
    )
    with caplog.at_level(logging.WARNING):
        tfds_io.ensure_built(builder, str(raw))
    meta = builder.info.metadata
    assert sorted(meta['skipped_cases']) == sorted(f'{c} ({d})' for c, d in expected.items())
    assert meta['skipped_by_reason'] == BRATS_COUNTS
    assert list(meta['skipped_by_reason'])[0] == 'non-finite values'  # most frequent first
    # One warning per skipped case, naming it and its file, when it is met.
    warned = [r.getMessage() for r in caplog.records if 'skipping case' in r.getMessage()]
    assert sorted(warned) == sorted(
        f'brats/{builder.builder_config.name}: skipping case {c}: {d}' for c, d in expected.items()
    )
    summary = (
        f'brats/{builder.builder_config.name}: skipped 8 of 10 cases (non-finite values: '
        '2, all-zero case: 1, constant modality: 1, missing file: 1, unexpected dtype: 1, '
        'unexpected shape: 1, unreadable file: 1): '
    )
    assert summary in capsys.readouterr().out
    data = tfds_io.read_split(builder, 'train')
    assert sorted(set(data['case_id'])) == [f'{PREFIX}00000', f'{PREFIX}00001']
    assert len(data['image']) == (2 if volumes else 2 * 5)
    assert np.isfinite(data['image'].astype(np.float32)).all()
    # The metadata survives a reload from disk (the CLI prints it from there).
    again = tfds_io.make_builder(
        'brats2021', data_dir=str(tmp_path / 'tfds'), resolution=16, volumes=volumes
    )
    assert again.info.metadata['skipped_by_reason'] == BRATS_COUNTS


def test_brats_all_cases_bad_is_one_data_error(tmp_path):
    raw = tmp_path / 'raw'
    raw.mkdir()
    mods, seg, brain = _case_volumes(0)
    _write_case(raw, f'{PREFIX}00001', np.zeros_like(mods), np.zeros_like(seg))
    nan = mods.copy()
    nan[3][brain] = np.nan
    _write_case(raw, f'{PREFIX}00002', nan, seg)
    builder = tfds_io.make_builder('brats2021', data_dir=str(tmp_path / 'tfds'), resolution=8)
    with pytest.raises(DataError) as e:
        tfds_io.ensure_built(builder, str(raw))
    assert str(e.value) == (
        f'brats/brats2021_r8: none of the 2 cases under {raw} can be used (all-zero case: 1, '
        f'non-finite values: 1); the first: {PREFIX}00001 (all-zero case: every modality in '
        f'{raw / (PREFIX + "00001")} is 0 in every voxel (no brain))'
    )
    assert '\n' not in str(e.value)
    assert not tfds_io.is_built(builder)


def test_msd_missing_and_nan_cases_are_skipped_naming_the_file(tmp_path):
    write_msd(tmp_path)
    root = tmp_path / 'Task01_BrainTumour'
    meta = json.loads((root / 'dataset.json').read_text())
    image = nib.load(str(root / 'imagesTr' / 'BRATS_001.nii.gz'))
    data = np.asarray(image.dataobj).copy()
    data[2, 3, 1, 2] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(root / 'imagesTr' / 'BRATS_003.nii.gz'))
    (root / 'labelsTr' / 'BRATS_003.nii.gz').write_bytes(
        (root / 'labelsTr' / 'BRATS_001.nii.gz').read_bytes()
    )
    meta['training'].append(
        {'image': './imagesTr/BRATS_003.nii.gz', 'label': './labelsTr/BRATS_003.nii.gz'}
    )
    (root / 'dataset.json').write_text(json.dumps(meta))
    builder = tfds_io.make_builder('msd_brain', data_dir=str(tmp_path / 'tfds'), resolution=16)
    tfds_io.ensure_built(builder, str(tmp_path))
    assert sorted(builder.info.metadata['skipped_cases']) == [
        f'BRATS_002 (missing file: no image {root}/imagesTr/BRATS_002.nii.gz and no segmentation '
        f'{root}/labelsTr/BRATS_002.nii.gz (listed in dataset.json))',
        f'BRATS_003 (non-finite values: image {root}/imagesTr/BRATS_003.nii.gz has 1 NaN and 0 '
        f'infinite of {4 * VOXELS} voxels)',
    ]
    assert set(tfds_io.read_split(builder, 'train')['case_id']) == {'BRATS_001'}


def test_reading_a_dataset_built_without_validation_refuses_non_finite_values(
    tmp_path, monkeypatch
):
    """A dataset built before the builders checked values (simulated by switching the checks
    off) holds a NaN channel: reading it is a DataError telling to rebuild it."""
    raw = tmp_path / 'raw'
    raw.mkdir()
    mods, seg, _ = _case_volumes(0)
    _write_case(raw, f'{PREFIX}00000', mods, seg)
    nan = mods.copy()
    nan[0][8, 8, 3] = np.nan
    _write_case(raw, f'{PREFIX}00001', nan, seg)
    monkeypatch.setattr(brats, '_nonfinite_text', lambda data: None)
    for volumes in (False, True):
        builder = tfds_io.make_builder(
            'brats2021', data_dir=str(tmp_path / 'tfds'), resolution=16, volumes=volumes
        )
        tfds_io.ensure_built(builder, str(raw))
        with pytest.raises(DataError) as e:
            if volumes:
                tfds_io.read_patches(
                    builder, 'train', patch_size=8, patches_per_case=2, tumour_fraction=0.5, seed=0
                )
            else:
                tfds_io.read_split(builder, 'train')
        what = (
            f'{PREFIX}00001 holds'
            if volumes
            else f'5 of 10 examples hold NaN or infinite values ({PREFIX}00001 slice 1, '
            f'{PREFIX}00001 slice 2, {PREFIX}00001 slice 3, {PREFIX}00001 slice 4, '
            f'{PREFIX}00001 slice 5); the dataset'
        )
        assert what in str(e.value)
        assert str(e.value).startswith(f'{builder.data_path} (train): ')
        assert str(e.value).endswith(f'Delete {builder.data_path} and build it again.')


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14: pixels
# ---------------------------------------------------------------------------------------------


def _nih_folder(root, i):
    return root / f'images_00{1 + i % 2}' / 'images'


def write_faulty_nih(root):
    """`write_nih` (one corrupt PNG, one missing), with more than 8-bit images and faults in
    place of some of its 8-bit PNGs. Returns the float and 16-bit source pixels."""
    write_nih(root)
    rng = np.random.default_rng(1)
    folder = lambda i: _nih_folder(root, i) / NIH_ROWS[i][0]
    # A float TIFF named .png, values in [0.1, 0.8] (it was stored black: PIL clips F to 0..255).
    as_float = rng.uniform(0.1, 0.8, (40, 40)).astype(np.float32)
    Image.fromarray(as_float, 'F').save(folder(0), format='TIFF')
    # A 16-bit PNG of a 12-bit detector: values 1000..3000 of 0..65535.
    as_16 = rng.integers(1000, 3001, (40, 40)).astype(np.uint16)
    Image.fromarray(as_16).save(folder(1))
    frames = [Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(folder(3), format='TIFF', save_all=True, append_images=frames[1:])
    with_nan = as_float.copy()
    with_nan[3, :2] = np.nan
    Image.fromarray(with_nan, 'F').save(folder(5), format='TIFF')
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(folder(6))  # test split: blank
    return as_float, as_16


def _expected_png(values, resolution):
    lo, hi = float(values.min()), float(values.max())
    pixels = np.rint(255.0 * (values.astype(np.float64) - lo) / (hi - lo)).astype(np.uint8)
    return np.asarray(
        Image.fromarray(pixels, 'L').resize((resolution, resolution), Image.Resampling.BOX)
    )


def test_nih_builder_converts_wide_images_by_their_range_and_skips_faults(tmp_path, caplog):
    manual = tmp_path / 'nih'
    as_float, as_16 = write_faulty_nih(manual)
    builder = tfds_io.make_builder(
        'nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=16
    )
    with caplog.at_level(logging.WARNING):
        tfds_io.ensure_built(builder, str(manual))
    meta = builder.info.metadata
    assert meta['skipped_train'] == 4 and meta['skipped_test'] == 1
    assert meta['skipped_train_by_reason'] == {
        'missing file': 1,
        'non-finite pixels': 1,
        'unexpected shape': 1,
        'unreadable file': 1,
    }
    assert meta['skipped_test_by_reason'] == {'constant image': 1}
    warned = {r.getMessage() for r in caplog.records if 'skipping' in r.getMessage()}
    path = lambda i: _nih_folder(manual, i) / NIH_ROWS[i][0]
    tag = 'nih_chestxray14/train: skipping'
    assert {
        f'{tag} 00000003_000.png: unexpected shape: {path(3)} holds 2 frames; expected one image',
        f'{tag} 00000005_000.png: non-finite pixels: {path(5)} (F pixels) has 2 NaN and 0 '
        'infinite of 1600 pixels',
        f'{tag} 00000009_000.png: missing file: 00000009_000.png is not under {manual} (images/, '
        'images_*/images/, images_*/)',
        f'nih_chestxray14/test: skipping 00000006_000.png: constant image: {path(6)} is 7 in '
        'every pixel',
    } <= warned
    assert any(
        m.startswith(f'{tag} 00000008_000.png: unreadable file: {path(8)} cannot be decoded (')
        for m in warned
    )
    train = tfds_io.read_split(builder, 'train')
    assert sorted(train['image_index']) == [
        '00000001_000.png',
        '00000001_001.png',
        '00000004_000.png',
    ]
    by_name = {n: i for i, n in enumerate(train['image_index'])}
    stored_float = train['image'][by_name['00000001_000.png'], ..., 0]
    np.testing.assert_array_equal(stored_float, _expected_png(as_float, 16))
    assert 100 < stored_float.mean() < 155  # mid-grey, not black
    np.testing.assert_array_equal(
        train['image'][by_name['00000001_001.png'], ..., 0], _expected_png(as_16, 16)
    )
    test = tfds_io.read_split(builder, 'test')
    assert sorted(test['image_index']) == ['00000002_000.png', '00000007_000.png']


def test_nih_split_whose_every_image_is_bad_is_one_data_error(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    for i, (name, *_rest) in enumerate(NIH_ROWS):
        if name in ('00000002_000.png', '00000006_000.png', '00000007_000.png'):  # the test split
            Image.fromarray(np.zeros((40, 40), np.uint8)).save(_nih_folder(manual, i) / name)
    builder = tfds_io.make_builder('nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=8)
    with pytest.raises(DataError) as e:
        tfds_io.ensure_built(builder, str(manual))
    assert str(e.value) == (
        'nih_chestxray14/test: none of the 3 images of the split can be used '
        '(constant image: 3); the first: 00000002_000.png (constant image)'
    )


# ---------------------------------------------------------------------------------------------
# NIH ChestX-ray14: the metadata CSV
# ---------------------------------------------------------------------------------------------


def _row(
    name='00000001_000.png', labels='Mass', follow_up='0', patient='1', age='40', sex='M', view='PA'
):
    return f'{name},{labels},{follow_up},{patient},{age},{sex},{view},2500,2048,0.171,0.171\n'


def _csv(tmp_path, *rows):
    path = tmp_path / 'Data_Entry_2017.csv'
    path.write_text(HEADER.format(sex='Patient Gender') + ''.join(rows))
    return path


def test_csv_unknown_view_names_file_line_and_value(tmp_path):
    path = _csv(tmp_path, _row(), _row('00000002_000.png', patient='2', view='P'))
    with pytest.raises(DataError) as e:
        nih_metadata.read_data_entry_csv(path)
    assert str(e.value) == (
        f"{path}: 1 bad row(s): line 3: unknown View Position 'P' (expected one of PA, AP)"
    )


def test_csv_missing_columns_are_named_together(tmp_path):
    path = tmp_path / 'Data_Entry_2017.csv'
    path.write_text('Image Index,Finding Labels,Patient ID,Patient Age\nx.png,Mass,1,40\n')
    with pytest.raises(DataError) as e:
        nih_metadata.read_data_entry_csv(path)
    assert str(e.value) == (
        f"{path}: line 1 (header): no column 'Follow-up #', 'Patient Gender' or 'Patient Sex', "
        "'View Position'; the columns are ['Finding Labels', 'Image Index', 'Patient Age', "
        "'Patient ID']. Is this Data_Entry_2017(_v2020).csv?"
    )


def test_csv_empty_file_and_header_without_rows(tmp_path):
    path = tmp_path / 'Data_Entry_2017.csv'
    path.write_text('')
    with pytest.raises(DataError) as e:
        nih_metadata.read_data_entry_csv(path)
    assert str(e.value) == (
        f'{path}: the file is empty; expected the header line of '
        'Data_Entry_2017(_v2020).csv (Image Index, Finding Labels, ...).'
    )
    path = _csv(tmp_path, '\n')
    with pytest.raises(DataError) as e:
        nih_metadata.read_data_entry_csv(path)
    assert str(e.value) == f'{path}: no data rows after the header (line 1).'


def test_csv_every_bad_row_is_counted_and_the_first_five_shown(tmp_path):
    path = _csv(
        tmp_path,
        _row(),  # line 2: good
        _row('00000002_000.png', patient='two'),  # 3
        _row('00000003_000.png', sex='X'),  # 4
        _row('00000004_000.png', labels='Mass|Tumour'),  # 5
        _row('00000001_000.png'),  # 6: repeats line 2
        '00000005_000.png,Mass,0\n',  # 7: too short
        _row('', patient='6'),  # 8
        _row('00000007_000.png', age='old'),
    )  # 9
    with pytest.raises(DataError) as e:
        nih_metadata.read_data_entry_csv(path)
    assert str(e.value) == (
        f"{path}: 7 bad row(s): line 3: Patient ID 'two' is not an integer; line 4: unknown sex "
        "'X' (expected one of M, F); line 5: unknown finding label 'Tumour' (expected 'No "
        "Finding' or Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule, Pneumonia, "
        'Pneumothorax, Consolidation, Edema, Emphysema, Fibrosis, Pleural_Thickening, Hernia, '
        "joined by |); line 6: Image Index '00000001_000.png' repeats line 2; line 7: 3 fields, "
        'expected at least 7 (as the header); ...'
    )


def test_csv_truncated_gzip_is_a_data_error(tmp_path):
    import gzip

    path = tmp_path / 'Data_Entry_2017.csv.gz'
    blob = gzip.compress((HEADER.format(sex='Patient Gender') + _row() * 2000).encode())
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(
        DataError,
        match=rf'^{path}: cannot be read as a CSV after line \d+ '
        r'\(EOFError: ',
    ):
        nih_metadata.read_data_entry_csv(path)


def test_nih_builder_csv_errors_and_no_image_for_any_row(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    csv_path = manual / 'Data_Entry_2017.csv'
    good = csv_path.read_text()
    builder = tfds_io.make_builder('nih_chestxray14', data_dir=str(tmp_path / 'tfds'), resolution=8)
    csv_path.write_text(good.replace(',AP,', ',P,', 1))  # was KeyError: 'P' from TFDS
    with pytest.raises(DataError) as e:
        tfds_io.ensure_built(builder, str(manual))
    assert str(e.value) == (
        f"{csv_path}: 1 bad row(s): line 4: unknown View Position 'P' (expected one of PA, AP)"
    )
    csv_path.write_text(good.replace('.png,', '.jpg,'))  # names that are not there
    with pytest.raises(DataError) as e:
        tfds_io.ensure_built(builder, str(manual))
    assert str(e.value) == (
        f'{csv_path}: none of its 10 rows names an image found under '
        f'{manual} (9 PNG files there, e.g. 00000001_000.png; the CSV names '
        'e.g. 00000001_000.jpg).'
    )
    csv_path.write_text(good)
    (manual / 'test_list.txt').write_text('99999999_000.png\n')
    with pytest.raises(DataError) as e:
        tfds_io.ensure_built(builder, str(manual))
    assert str(e.value) == (
        f'{manual / "test_list.txt"}: names none of the 10 images of '
        f'{csv_path}, so the test split would be empty.'
    )
    assert not tfds_io.is_built(builder)


def test_build_cli_prints_a_data_error_as_one_line_and_the_skip_counts(tmp_path):
    manual = write_nih(tmp_path / 'nih')
    csv_path = manual / 'Data_Entry_2017.csv'
    csv_path.write_text(csv_path.read_text().replace(',AP,', ',P,', 1))
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
    )
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f'error: {csv_path}: 1 bad row(s): line 4: unknown '
        "View Position 'P' (expected one of PA, AP)"
    )
    assert 'Traceback' not in out.stderr
    raw = tmp_path / 'raw'
    write_faulty_brats(raw)
    out = subprocess.run(
        [
            sys.executable,
            '-m',
            'fedjax_med.data.build',
            '--dataset=brats2021',
            f'--manual_dir={raw}',
            f'--data_dir={tmp_path / "tfds"}',
            '--resolution=8',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '  train: 10 examples' in out.stdout
    assert '  skipped_cases: 8' in out.stdout
    assert (
        '  skipped_by_reason: non-finite values: 2, all-zero case: 1, constant modality: 1, '
        'missing file: 1, unexpected dtype: 1, unexpected shape: 1, unreadable file: 1'
        in out.stdout
    )
