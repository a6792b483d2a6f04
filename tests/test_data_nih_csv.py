"""The NIH metadata parser against the real CSV, and the shipped table against the real counts."""

import collections
import csv
import gzip
import pathlib

import numpy as np
import pytest

from fedjax_med.data import nih_metadata

REAL_CSV = (
    pathlib.Path(__file__).resolve().parents[1]
    / '..'
    / 'shared'
    / 'data'
    / 'nih_chestxray14'
    / 'Data_Entry_2017_v2020.csv.gz'
)
# Published per-label image counts of ChestX-ray14 (a few, checked independently of the parser).
KNOWN = {
    'Infiltration': 19894,
    'Effusion': 13317,
    'Atelectasis': 11559,
    'Hernia': 227,
    'No Finding': 60361,
}

needs_csv = pytest.mark.skipif(not REAL_CSV.exists(), reason=f'{REAL_CSV} not present')


def _independent_counts(path):
    """A deliberately naive reader: the bracketed headers come after the columns we need."""
    with gzip.open(path, 'rt', newline='') as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    i_lab, i_pid = header.index('Finding Labels'), header.index('Patient ID')
    counts = collections.Counter(lab for r in rows for lab in r[i_lab].split('|'))
    return len(rows), len({r[i_pid] for r in rows}), counts


@needs_csv
def test_real_csv_parses_to_published_counts():
    entries = nih_metadata.read_data_entry_csv(REAL_CSV)
    n, patients, counts = _independent_counts(REAL_CSV)
    assert len(entries['image_index']) == n == 112_120
    assert len(np.unique(entries['patient_id'])) == patients == 30_805
    per_label = entries['labels'].sum(0)
    for i, name in enumerate(nih_metadata.CXR_LABELS):
        assert per_label[i] == counts[name], name
    assert (entries['labels'].sum(1) == 0).sum() == counts['No Finding']
    for name, value in KNOWN.items():
        assert counts[name] == value
        if name != 'No Finding':
            assert per_label[nih_metadata.CXR_LABELS.index(name)] == value
    assert set(entries['sex']) == {'M', 'F'} and set(entries['view']) == {'PA', 'AP'}
    assert entries['image_index'][0] == '00000001_000.png'


@needs_csv
def test_shipped_table_matches_real_csv():
    table = nih_metadata.load_metadata_table()
    entries = nih_metadata.read_data_entry_csv(REAL_CSV)
    np.testing.assert_array_equal(table['labels'], entries['labels'].astype(np.float32))
    np.testing.assert_array_equal(table['patient_id'], entries['patient_id'])
    np.testing.assert_array_equal(table['view'], entries['view'] == 'AP')
    np.testing.assert_array_equal(table['sex'], entries['sex'] == 'F')
    np.testing.assert_array_equal(table['age'], entries['age'])
    names = [
        f'{p:08d}_{i:03d}.png'
        for p, i in zip(table['patient_id'], table['image_number'], strict=True)
    ]
    assert names == list(entries['image_index'])


def test_shipped_table_is_small_and_complete():
    path = pathlib.Path(nih_metadata.__file__).parent / 'resources' / 'nih_metadata.npz'
    assert path.stat().st_size < 1_500_000
    table = nih_metadata.load_metadata_table()
    assert len(table['patient_id']) == 112_120
    assert table['labels'].sum(0)[nih_metadata.CXR_LABELS.index('Hernia')] == 227
    assert (table['labels'].sum(1) == 0).sum() == 60_361


def test_parser_handles_bracketed_headers_and_patient_sex(tmp_path):
    text = (
        'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,'
        'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n'
        '00000007_000.png,Hernia|Mass,0,7,061Y,F,AP,2500,2048,0.171,0.171\n'
        '00000008_002.png,No Finding,2,8,30,M,PA,2048,2500,0.168,0.168\n'
    )
    path = tmp_path / 'Data_Entry_2017.csv'
    path.write_text(text)
    entries = nih_metadata.read_data_entry_csv(path)
    assert list(entries['patient_id']) == [7, 8]
    assert list(entries['age']) == [61, 30]
    assert list(entries['sex']) == ['F', 'M'] and list(entries['view']) == ['AP', 'PA']
    expected = np.zeros((2, 14), np.uint8)
    expected[0, [nih_metadata.CXR_LABELS.index(n) for n in ('Hernia', 'Mass')]] = 1
    np.testing.assert_array_equal(entries['labels'], expected)
    bits = nih_metadata.multihot_to_bits(entries['labels'])
    np.testing.assert_array_equal(nih_metadata.bits_to_multihot(bits), expected)


def test_parser_names_missing_column(tmp_path):
    path = tmp_path / 'bad.csv'
    path.write_text('Image Index,Finding Labels\nx.png,Mass\n')
    with pytest.raises(ValueError, match='Follow-up'):
        nih_metadata.read_data_entry_csv(path)
