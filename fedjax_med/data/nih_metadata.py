"""NIH ChestX-ray14 metadata: label order, CSV parser, and the compact table shipped in the package.

`read_data_entry_csv` parses `Data_Entry_2017.csv` / `Data_Entry_2017_v2020.csv` (optionally
gzipped) by column *name*. Two headers, `OriginalImage[Width,Height]` and
`OriginalImagePixelSpacing[x,y]`, contain commas, so a data row has more raw fields than the
header has names; the parser rebuilds the bracketed names and maps every name to its raw field(s).

`load_metadata_table` reads `resources/nih_metadata.npz`, a compact per-image table derived from the
real CSV (see `resources/PROVENANCE.md`); the synthetic twin draws label vectors, patient ids,
views, ages and sexes from it, so its label frequencies and co-occurrences are the real ones.
Regenerate it with `python -m fedjax_med.data.nih_metadata --csv=PATH`.

A CSV that cannot be used raises `errors.DataError`, one line naming the file, the line and the
problem: an empty file, a missing column (all of them at once), a file with a header and no
rows, and rows with too few fields, an unknown finding, view (not PA/AP) or sex (not M/F), a
follow-up number, patient id or age that is not an integer, an empty or repeated Image Index (the
first five bad lines are shown, with the count of all).
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import os
import sys

import numpy as np

from fedjax_med.data.errors import DataError

CXR_LABELS: tuple[str, ...] = (
    'Atelectasis',
    'Cardiomegaly',
    'Effusion',
    'Infiltration',
    'Mass',
    'Nodule',
    'Pneumonia',
    'Pneumothorax',
    'Consolidation',
    'Edema',
    'Emphysema',
    'Fibrosis',
    'Pleural_Thickening',
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
    raise KeyError(' or '.join(repr(n) for n in names))


def labels_to_multihot(finding_labels: str) -> np.ndarray:
    """'Cardiomegaly|Effusion' -> uint8 [14] in `CXR_LABELS` order; 'No Finding' -> all zeros."""
    out = np.zeros(len(CXR_LABELS), np.uint8)
    for name in finding_labels.split('|'):
        name = name.strip()
        if not name or name == NO_FINDING:
            continue
        if name not in CXR_LABELS:
            raise ValueError(
                f'unknown finding label {name!r} (expected {NO_FINDING!r} or '
                f'{", ".join(CXR_LABELS)}, joined by |)'
            )
        out[CXR_LABELS.index(name)] = 1
    return out


_COLUMNS = {
    'image': ('Image Index',),
    'labels': ('Finding Labels',),
    'follow_up': ('Follow-up #',),
    'patient_id': ('Patient ID',),
    'age': ('Patient Age',),
    'sex': ('Patient Gender', 'Patient Sex'),
    'view': ('View Position',),
}
_MAX_SHOWN = 5


def _integer(text: str, column: str, strip: str = '') -> int:
    value = text.strip().rstrip(strip)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'{column} {text!r} is not an integer') from None


def _parse_row(row: list[str], at: dict[str, int], needed: int) -> tuple:
    """(image, labels, follow-up, patient id, age, sex, view) of one data row; ValueError says
    what is wrong with it."""
    if len(row) <= needed:
        raise ValueError(f'{len(row)} fields, expected at least {needed + 1} (as the header)')
    image = row[at['image']].strip()
    if not image:
        raise ValueError('empty Image Index')
    labels = labels_to_multihot(row[at['labels']])
    follow_up = _integer(row[at['follow_up']], 'Follow-up #')
    patient = _integer(row[at['patient_id']], 'Patient ID')
    # Some releases write ages as '058Y'; an empty age is unknown (-1).
    age = _integer(row[at['age']], 'Patient Age', 'YyMmDd') if row[at['age']].strip() else -1
    sex = row[at['sex']].strip().upper()
    if sex not in SEXES:
        raise ValueError(
            f'unknown sex {row[at["sex"]].strip()!r} (expected one of {", ".join(SEXES)})'
        )
    view = row[at['view']].strip().upper()
    if view not in VIEWS:
        raise ValueError(
            f'unknown View Position {row[at["view"]].strip()!r} (expected one of '
            f'{", ".join(VIEWS)})'
        )
    return image, labels, follow_up, patient, age, sex, view


# Long on purpose: one pass over the CSV's columns, each parsed and checked where it is read,
# so every error names its row and column.
def read_data_entry_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parses the official per-image metadata CSV by column name.

    Returns arrays of equal length: 'image_index' (str), 'labels' (uint8 [n, 14]), 'patient_id'
    (int64), 'follow_up' (int64), 'age' (int64, -1 when empty), 'sex' (str 'M'/'F'), 'view'
    (str 'PA'/'AP'). Accepts either `Patient Gender` or `Patient Sex`. Raises DataError naming
    the file, the line(s) and the problem (see the module docstring).
    """
    rows, problems, first_line = [], [], {}
    line_no = 1
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(
                    f'{path}: the file is empty; expected the header line of '
                    'Data_Entry_2017(_v2020).csv (Image Index, Finding Labels, ...).'
                )
            columns = _column_fields(header)
            at, absent = {}, []
            for key, names in _COLUMNS.items():
                try:
                    at[key] = _field(columns, *names)
                except KeyError as e:
                    absent.append(e.args[0])
            if absent:
                raise DataError(
                    f'{path}: line 1 (header): no column {", ".join(absent)}; the '
                    f'columns are {sorted(columns)}. Is this '
                    'Data_Entry_2017(_v2020).csv?'
                )
            needed = max(at.values())
            for row in reader:
                line_no = reader.line_num
                if not row or not any(field.strip() for field in row):
                    continue
                try:
                    parsed = _parse_row(row, at, needed)
                except ValueError as e:
                    problems.append(f'line {line_no}: {e}')
                    continue
                if parsed[0] in first_line:
                    problems.append(
                        f'line {line_no}: Image Index {parsed[0]!r} repeats line '
                        f'{first_line[parsed[0]]}'
                    )
                    continue
                first_line[parsed[0]] = line_no
                rows.append(parsed)
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:  # truncated .gz, binary
        raise DataError(
            f'{path}: cannot be read as a CSV after line {line_no} ({type(e).__name__}: {e}).'
        ) from e
    if problems:
        shown = '; '.join(problems[:_MAX_SHOWN]) + ('; ...' if len(problems) > _MAX_SHOWN else '')
        raise DataError(f'{path}: {len(problems)} bad row(s): {shown}')
    if not rows:
        raise DataError(f'{path}: no data rows after the header (line 1).')
    img, lab, fu, pid, age, sex, view = zip(*rows, strict=True)
    return {
        'image_index': np.asarray(img),
        'labels': np.stack(lab),
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
