"""NIH ChestX-ray14 metadata: label order, CSV parser, and the compact table shipped in the package.

`read_data_entry_csv` parses `Data_Entry_2017.csv` / `Data_Entry_2017_v2020.csv` (optionally
gzipped) by column *name*. Two headers, `OriginalImage[Width,Height]` and
`OriginalImagePixelSpacing[x,y]`, contain commas, so a data row has more raw fields than the
header has names; the parser rebuilds the bracketed names and maps every name to its raw field(s).

`load_metadata_table` reads `resources/nih_metadata.npz`, a compact per-image table derived from the
real CSV (see `resources/PROVENANCE.md`); the synthetic twin draws label vectors, patient ids,
views, ages and sexes from it, so its label frequencies and co-occurrences are the real ones.
Regenerate it with `python -m fedjax_med.data.nih_metadata --csv=PATH`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import os
import sys

import numpy as np

CXR_LABELS: tuple[str, ...] = (
    'Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
    'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening',
    'Hernia',
)
NO_FINDING = 'No Finding'
VIEWS: tuple[str, ...] = ('PA', 'AP')
SEXES: tuple[str, ...] = ('M', 'F')
_TABLE_RESOURCE = 'nih_metadata.npz'


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    path = os.fspath(path)
    if path.endswith('.gz'):
        return gzip.open(path, 'rt', newline='')
    return open(path, newline='')


def _column_fields(header: list[str]) -> dict[str, list[int]]:
    """Maps each column name to the raw field indices it spans (bracketed names span several)."""
    columns: dict[str, list[int]] = {}
    pending_name, pending_fields = None, []
    for i, raw in enumerate(header):
        raw = raw.strip()
        if pending_name is not None:
            pending_name += ',' + raw
            pending_fields.append(i)
            if ']' in raw:
                columns[pending_name] = pending_fields
                pending_name, pending_fields = None, []
            continue
        if '[' in raw and ']' not in raw:
            pending_name, pending_fields = raw, [i]
            continue
        if raw:
            columns[raw] = [i]
    return columns


def _field(columns: dict[str, list[int]], *names: str) -> int:
    for name in names:
        if name in columns:
            return columns[name][0]
    raise ValueError(f'NIH metadata CSV: none of the columns {names} found; columns are '
                     f'{sorted(columns)}. Is this Data_Entry_2017(_v2020).csv?')


def labels_to_multihot(finding_labels: str) -> np.ndarray:
    """'Cardiomegaly|Effusion' -> uint8 [14] in `CXR_LABELS` order; 'No Finding' -> all zeros."""
    out = np.zeros(len(CXR_LABELS), np.uint8)
    for name in finding_labels.split('|'):
        name = name.strip()
        if not name or name == NO_FINDING:
            continue
        if name not in CXR_LABELS:
            raise ValueError(f'Unknown finding label {name!r}; expected one of {CXR_LABELS}.')
        out[CXR_LABELS.index(name)] = 1
    return out


def read_data_entry_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parses the official per-image metadata CSV by column name.

    Returns arrays of equal length: 'image_index' (str), 'labels' (uint8 [n, 14]), 'patient_id'
    (int64), 'follow_up' (int64), 'age' (int64), 'sex' (str 'M'/'F'), 'view' (str 'PA'/'AP').
    Accepts either `Patient Gender` or `Patient Sex`.
    """
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader)
        columns = _column_fields(header)
        i_img = _field(columns, 'Image Index')
        i_lab = _field(columns, 'Finding Labels')
        i_fu = _field(columns, 'Follow-up #')
        i_pid = _field(columns, 'Patient ID')
        i_age = _field(columns, 'Patient Age')
        i_sex = _field(columns, 'Patient Gender', 'Patient Sex')
        i_view = _field(columns, 'View Position')
        needed = max(i_img, i_lab, i_fu, i_pid, i_age, i_sex, i_view)
        img, lab, fu, pid, age, sex, view = [], [], [], [], [], [], []
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= needed:
                raise ValueError(
                    f'{path}: line {line_no} has {len(row)} fields, expected > {needed}.')
            img.append(row[i_img].strip())
            lab.append(labels_to_multihot(row[i_lab]))
            fu.append(int(row[i_fu]))
            pid.append(int(row[i_pid]))
            # Some releases write ages as '058Y'.
            age.append(int(row[i_age].strip().rstrip('YyMmDd') or -1))
            sex.append(row[i_sex].strip())
            view.append(row[i_view].strip())
    return {
        'image_index': np.asarray(img),
        'labels': np.stack(lab) if lab else np.zeros((0, len(CXR_LABELS)), np.uint8),
        'patient_id': np.asarray(pid, np.int64),
        'follow_up': np.asarray(fu, np.int64),
        'age': np.asarray(age, np.int64),
        'sex': np.asarray(sex),
        'view': np.asarray(view),
    }


_BIT = np.uint16(1) << np.arange(len(CXR_LABELS), dtype=np.uint16)


def multihot_to_bits(labels: np.ndarray) -> np.ndarray:
    """Multi-hot [..., 14] -> uint16 bitmask (bit i = finding i of `CXR_LABELS`)."""
    return (labels.astype(np.uint16) * _BIT).sum(-1).astype(np.uint16)


def bits_to_multihot(bits: np.ndarray) -> np.ndarray:
    """uint16 bitmask -> float32 multi-hot [..., 14]."""
    return ((bits[..., None].astype(np.uint16) & _BIT) > 0).astype(np.float32)


def compact_table(entries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The small per-image table shipped in the package (see resources/PROVENANCE.md)."""
    image_number = np.asarray([int(s.split('_')[1].split('.')[0]) for s in entries['image_index']])
    prefix = np.asarray([int(s.split('_')[0]) for s in entries['image_index']])
    if not np.array_equal(prefix, entries['patient_id']):
        raise ValueError('Image Index prefix differs from Patient ID: cannot rebuild names.')
    return {
        'patient_id': entries['patient_id'].astype(np.int32),
        'image_number': image_number.astype(np.uint16),
        'follow_up': entries['follow_up'].astype(np.uint16),
        'label_bits': multihot_to_bits(entries['labels']),
        'age': np.clip(entries['age'], 0, 255).astype(np.uint8),
        'sex': (entries['sex'] == 'F').astype(np.uint8),
        'view': (entries['view'] == 'AP').astype(np.uint8),
    }


def load_metadata_table() -> dict[str, np.ndarray]:
    """The shipped table as arrays: 'labels' float32 [112120, 14], 'patient_id' int64, 'view' (0 PA,
    1 AP), 'sex' (0 M, 1 F), 'age', 'follow_up', 'image_number' (image name is
    f'{patient_id:08d}_{image_number:03d}.png')."""
    ref = importlib.resources.files('fedjax_med.data') / 'resources' / _TABLE_RESOURCE
    with ref.open('rb') as f, np.load(f) as z:
        table = {k: z[k] for k in z.files}
    return {
        'labels': bits_to_multihot(table['label_bits']),
        'patient_id': table['patient_id'].astype(np.int64),
        'image_number': table['image_number'].astype(np.int64),
        'follow_up': table['follow_up'].astype(np.int64),
        'age': table['age'].astype(np.int64),
        'sex': table['sex'].astype(np.int64),
        'view': table['view'].astype(np.int64),
    }


def _main(argv: list[str]) -> None:
    import argparse
    parser = argparse.ArgumentParser(description='Regenerate resources/nih_metadata.npz.')
    parser.add_argument('--csv', required=True, help='Data_Entry_2017_v2020.csv(.gz)')
    default_out = os.path.join(os.path.dirname(__file__), 'resources', _TABLE_RESOURCE)
    parser.add_argument('--out', default=default_out)
    args = parser.parse_args(argv)
    table = compact_table(read_data_entry_csv(args.csv))
    np.savez_compressed(args.out, **table)
    print(f'wrote {args.out}: {len(table["patient_id"])} rows, {os.path.getsize(args.out)} bytes')


if __name__ == '__main__':
    _main(sys.argv[1:])
