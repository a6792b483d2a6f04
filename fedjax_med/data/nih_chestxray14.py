"""TFDS builder for NIH ChestX-ray14 from the official release in a manual directory.

Writes `array_record` files (read with `builder.as_data_source()`), never imports TensorFlow:
images are resized with PIL and stored as PNG bytes. One builder config per stored resolution
(`r224` default; any resolution via `NihChestXray14Config(resolution=...)`).

Splits: 'train' and 'test'. With `train_val_list.txt` and `test_list.txt` in the manual dir they are
the official patient-wise lists (metadata 'official_split': True); without them patients are split
with a fixed seed, 20% to test. Image files that are missing or cannot be decoded are skipped,
counted and reported at the end of generation (and stored in the dataset metadata).
"""

from __future__ import annotations

import io
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fedjax_med.data import nih_metadata

_CSV_NAMES = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv', 'Data_Entry_2017_v2020.csv.gz',
              'Data_Entry_2017.csv.gz')
_FALLBACK_TEST_FRACTION = 0.2
_FALLBACK_SEED = 0

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the NIH ChestX-ray14 release from https://nihcc.app.box.com/v/ChestXray-NIHCC (free,
requires accepting the NIH terms; cite Wang et al., CVPR 2017) and put into the manual dir:
  images_001.tar.gz .. images_012.tar.gz, extracted: either images/*.png or
      images_001/images/*.png .. images_012/images/*.png
  Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)
  train_val_list.txt and test_list.txt (optional; official patient-wise split)
Then: python -m fedjax_med.data.build --dataset=nih_chestxray14 --manual_dir=DIR --data_dir=DIR
"""


class NihChestXray14Config(tfds.core.BuilderConfig):
    """Stored image side in pixels (images are resized, grayscale, PNG-encoded)."""

    def __init__(self, *, resolution: int = 224, **kwargs):
        super().__init__(name=f'r{resolution}',
                         description=f'{resolution}x{resolution} grayscale PNG', **kwargs)
        self.resolution = resolution


def find_csv(manual_dir: pathlib.Path) -> pathlib.Path:
    for name in _CSV_NAMES:
        if (manual_dir / name).exists():
            return manual_dir / name
    raise FileNotFoundError(
        f'No metadata CSV in {manual_dir}: expected one of {_CSV_NAMES}.\n'
        + MANUAL_DOWNLOAD_INSTRUCTIONS)


def find_images(manual_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Image Index -> path, over `images/*.png` and `images_NNN/images/*.png` (and images_NNN/*)."""
    found = {}
    for pattern in ('images/*.png', 'images_*/images/*.png', 'images_*/*.png'):
        for path in manual_dir.glob(pattern):
            found.setdefault(path.name, path)
    if not found:
        raise FileNotFoundError(
            f'No PNG images under {manual_dir} (looked in images/ and images_*/images/).\n'
            + MANUAL_DOWNLOAD_INSTRUCTIONS)
    return found


def _read_list(path: pathlib.Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def split_of(entries: dict[str, np.ndarray], manual_dir: pathlib.Path) -> tuple[np.ndarray, bool]:
    """Boolean 'is test' per row and whether it came from the official lists."""
    train_list, test_list = manual_dir / 'train_val_list.txt', manual_dir / 'test_list.txt'
    if test_list.exists():
        test = _read_list(test_list)
        if train_list.exists():
            unknown = set(entries['image_index']) - test - _read_list(train_list)
            if unknown:
                logging.warning('%d images are in neither split list; they go to train.',
                                len(unknown))
        return np.isin(entries['image_index'], list(test)), True
    patients = np.unique(entries['patient_id'])
    rng = np.random.default_rng(_FALLBACK_SEED)
    test_patients = rng.choice(patients, int(round(_FALLBACK_TEST_FRACTION * len(patients))),
                               replace=False)
    return np.isin(entries['patient_id'], test_patients), False


def encode_png(path: pathlib.Path, resolution: int) -> bytes:
    """Reads any PNG (8/16-bit, RGB(A) or L), returns a resized 8-bit grayscale PNG."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ('I', 'I;16', 'I;16B'):
            arr = np.asarray(im, np.float32)
            arr = 255.0 * (arr - arr.min()) / max(float(np.ptp(arr)), 1.0)
            im = Image.fromarray(arr.astype(np.uint8))
        im = im.convert('L')
        # BOX resampling averages source pixels: no aliasing when shrinking 1024 -> 224.
        im = im.resize((resolution, resolution), Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, format='PNG')
    return buf.getvalue()


class NihChestXray14(tfds.core.GeneratorBasedBuilder):
    """NIH ChestX-ray14: 112,120 frontal chest radiographs, 14 multi-label findings."""

    name = 'nih_chestxray14'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [NihChestXray14Config(resolution=r) for r in (224, 128, 64, 32)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description='NIH Clinical Center ChestX-ray14 (Wang et al., CVPR 2017).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(r, r, 1), encoding_format='png'),
                'label': tfds.features.Tensor(shape=(len(nih_metadata.CXR_LABELS),),
                                              dtype=np.uint8),
                'image_index': tfds.features.Text(),
                'patient_id': np.int64,
                'follow_up': np.int32,
                'age': np.int32,
                'sex': tfds.features.ClassLabel(names=list(nih_metadata.SEXES)),
                'view': tfds.features.ClassLabel(names=list(nih_metadata.VIEWS)),
            }),
            homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
            citation='Wang et al., ChestX-ray8: Hospital-scale Chest X-ray Database and '
                     'Benchmarks, CVPR 2017.',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
        entries = nih_metadata.read_data_entry_csv(find_csv(manual_dir))
        images = find_images(manual_dir)
        is_test, official = split_of(entries, manual_dir)
        self.info.metadata['official_split'] = official
        self.info.metadata['label_names'] = list(nih_metadata.CXR_LABELS)
        self._skipped: dict[str, list[str]] = {}
        return {
            'train': self._generate_examples(entries, ~is_test, images, 'train'),
            'test': self._generate_examples(entries, is_test, images, 'test'),
        }

    def _generate_examples(self, entries, keep, images, split):
        r = self.builder_config.resolution
        skipped = self._skipped.setdefault(split, [])
        for i in np.flatnonzero(keep):
            name = str(entries['image_index'][i])
            path = images.get(name)
            if path is None:
                skipped.append(f'{name} (missing)')
                continue
            try:
                png = encode_png(path, r)
            except (OSError, ValueError) as e:  # truncated / corrupt files
                skipped.append(f'{name} ({type(e).__name__}: {e})')
                continue
            yield name, {
                'image': png,
                'label': entries['labels'][i],
                'image_index': name,
                'patient_id': int(entries['patient_id'][i]),
                'follow_up': int(entries['follow_up'][i]),
                'age': int(entries['age'][i]),
                'sex': str(entries['sex'][i]),
                'view': str(entries['view'][i]),
            }
        # Runs once the split's examples are exhausted: the end-of-split report.
        self.info.metadata[f'skipped_{split}'] = len(skipped)
        if skipped:
            shown = ', '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else '')
            message = (f'nih_chestxray14/{split}: skipped {len(skipped)} of '
                       f'{int(keep.sum())} images: {shown}')
            logging.warning(message)
            print(message)
