"""Builds a TFDS dataset of fedjax_med into a data dir and prints its split sizes.

  python -m fedjax_med.data.build --dataset=nih_chestxray14 --manual_dir=/data/nih \
      --data_dir=~/tensorflow_datasets --resolution=224
  python -m fedjax_med.data.build --dataset=synthetic_cxr --data_dir=/tmp/tfds --num_examples=500
  python -m fedjax_med.data.build --dataset=brats2021 --volumes --manual_dir=/data/brats  # 3-D

Cases and images that fail validation are skipped, each logged as a warning naming its file, and
counted per reason in the printed summary (`skipped_by_reason`, `skipped_<split>_by_reason`).
Raw data that cannot be built (a malformed CSV, no usable case) prints one line, `error: FILE:
...`, and exits with status 1.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fedjax_med.data import errors, tfds_io
from fedjax_med.data.registry import BRATS_VERSIONS, REAL, SYNTHETIC

_DATASET = flags.DEFINE_enum(
    'dataset', None, list(REAL + SYNTHETIC), 'Dataset to build (a data.name).'
)
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Raw files of a real dataset.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default ~/tensorflow_datasets).')
_RESOLUTION = flags.DEFINE_integer(
    'resolution', None, 'Stored image side (default 224 NIH, 128 BraTS, 64 synthetic).'
)
_NUM_EXAMPLES = flags.DEFINE_integer(
    'num_examples', 2500, 'Synthetic: images (CXR) or cases (BraTS).'
)
_SEED = flags.DEFINE_integer('seed', 0, 'Synthetic: generator seed.')
_SLICES = flags.DEFINE_integer('slices_per_case', 16, 'Synthetic BraTS: slices per case.')
_BRAIN_ONLY = flags.DEFINE_bool('brain_slices_only', True, 'BraTS: drop slices without brain.')
_EMPTY_STRIDE = flags.DEFINE_integer(
    'empty_slice_stride', 1, 'BraTS: keep every k-th slice without tumour.'
)
_VOLUMES = flags.DEFINE_bool(
    'volumes', False, 'BraTS: store one 3-D volume per case (for data.patch_size > 0).'
)

_DEFAULT_RESOLUTION = {'nih_chestxray14': 224, **{version: 128 for version in BRATS_VERSIONS}}


def main(argv: list[str]) -> None:
    del argv
    name = _DATASET.value
    try:
        builder = tfds_io.make_builder(
            name,
            data_dir=_DATA_DIR.value,
            resolution=_RESOLUTION.value or _DEFAULT_RESOLUTION.get(name, 64),
            num_examples=_NUM_EXAMPLES.value,
            seed=_SEED.value,
            slices_per_case=_SLICES.value,
            brain_slices_only=_BRAIN_ONLY.value,
            empty_slice_stride=_EMPTY_STRIDE.value,
            volumes=_VOLUMES.value,
        )
    except ValueError as e:  # settings that do not fit the dataset, e.g. --volumes for NIH
        sys.exit(f'error: {e}')
    try:
        tfds_io.ensure_built(builder, _MANUAL_DIR.value)
    except (FileNotFoundError, errors.DataError) as e:  # DataError: one line, file and problem
        sys.exit(f'error: {e}')
    print(f'{builder.name}/{builder.builder_config.name} {builder.version} in {builder.data_dir}')
    for split, info in sorted(builder.info.splits.items()):
        print(f'  {split}: {info.num_examples} examples')
    for key, value in (builder.info.metadata or {}).items():
        if key.startswith('skipped') or key == 'official_split':
            if isinstance(value, list):
                value = len(value)
            elif isinstance(value, dict):  # reason -> count
                value = errors.reasons_text(value) or 'none'
            print(f'  {key}: {value}')
    print('tensorflow imported:', 'tensorflow' in sys.modules)


if __name__ == '__main__':
    flags.mark_flag_as_required('dataset')
    app.run(main)
