"""TFDS builder for NIH ChestX-ray14 from the official release in a manual directory.

Writes `array_record` files (read with `builder.as_data_source()`), never imports TensorFlow:
images are resized with PIL and stored as PNG bytes. One builder config per stored resolution
(`r224` default; any resolution via `NihChestXray14Config(resolution=...)`).

Splits: 'train' and 'test'. With `train_val_list.txt` and `test_list.txt` in the manual dir they are
the official patient-wise lists (metadata 'official_split': True); without them patients are split
with a fixed seed, 20% to test.

Pixels. The official release is 8-bit grayscale PNG, stored as it is (resized). Other 8-bit images
(RGB(A), palette, grey + alpha) are converted to grayscale luminance, alpha dropped. An image of
more than 8 bits (16-bit or 32-bit integer, or 32-bit float, e.g. a TIFF or 16-bit PNG exported
from DICOM, whatever its file name says) is rescaled linearly from its own minimum..maximum pixel
value to 0..255: the file holds no window, and its real range is what the detector recorded
(a 12-bit image in a 16-bit file only uses 0..4095, so dividing by 65535 would store it nearly
black; clipping a float image in [0, 1] to 0..255 stored it black). DICOM's MONOCHROME1
inversion is not known from a PNG: such images must be inverted before they are built.

Every image is validated, and skipped under one of these reasons (`SKIP_REASONS`):

  missing file              no file of that name under the image folders
  unreadable file           PIL cannot decode it (truncated or corrupt)
  unsupported pixel format  a PIL mode that is neither 8-bit nor 16/32-bit integer or float
  unexpected shape          a multi-frame image
  non-finite pixels         a NaN or infinite pixel (float images)
  constant image            every pixel has one value (a blank export)

Each skipped image is logged as a warning naming its file (the first 50 per split and reason,
then only counted), and each split ends with the count per reason; the dataset metadata holds
`skipped_<split>` (count) and `skipped_<split>_by_reason` (reason -> count). Faults of the CSV
(`nih_metadata.read_data_entry_csv`), a CSV naming no image that is there, an empty split and a
split whose every image is skipped stop the build with a one-line `DataError`.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fedjax_med.data import errors, nih_metadata

_CSV_NAMES = (
    'Data_Entry_2017_v2020.csv',
    'Data_Entry_2017.csv',
    'Data_Entry_2017_v2020.csv.gz',
    'Data_Entry_2017.csv.gz',
)
_FALLBACK_TEST_FRACTION = 0.2
_FALLBACK_SEED = 0
_WARNINGS_PER_REASON = 50

MISSING = 'missing file'
UNREADABLE = 'unreadable file'
BAD_MODE = 'unsupported pixel format'
BAD_SHAPE = 'unexpected shape'
NON_FINITE = 'non-finite pixels'
CONSTANT = 'constant image'
SKIP_REASONS = (MISSING, UNREADABLE, BAD_MODE, BAD_SHAPE, NON_FINITE, CONSTANT)
# PIL modes of 8 bits per channel: converted to grayscale ('L') by PIL.
_EIGHT_BIT_MODES = frozenset(
    {'1', 'L', 'LA', 'La', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV'}
)

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
        super().__init__(
            name=f'r{resolution}', description=f'{resolution}x{resolution} grayscale PNG', **kwargs
        )
        self.resolution = resolution


def find_csv(manual_dir: pathlib.Path) -> pathlib.Path:
    for name in _CSV_NAMES:
        if (manual_dir / name).exists():
            return manual_dir / name
    raise FileNotFoundError(
        f'No metadata CSV in {manual_dir}: expected one of {_CSV_NAMES}.\n'
        + MANUAL_DOWNLOAD_INSTRUCTIONS
    )


def find_images(manual_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Image Index -> path, over `images/*.png` and `images_NNN/images/*.png` (and images_NNN/*)."""
    found = {}
    for pattern in ('images/*.png', 'images_*/images/*.png', 'images_*/*.png'):
        for path in manual_dir.glob(pattern):
            found.setdefault(path.name, path)
    if not found:
        raise FileNotFoundError(
            f'No PNG images under {manual_dir} (looked in images/ and images_*/images/).\n'
            + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
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
                logging.warning(
                    '%d images are in neither split list; they go to train.', len(unknown)
                )
        return np.isin(entries['image_index'], list(test)), True
    patients = np.unique(entries['patient_id'])
    rng = np.random.default_rng(_FALLBACK_SEED)
    test_patients = rng.choice(
        patients, int(round(_FALLBACK_TEST_FRACTION * len(patients))), replace=False
    )
    return np.isin(entries['patient_id'], test_patients), False


class ImageError(errors.SkippedInput):
    """An image that cannot be used: skipped, counted under `reason` (one of `SKIP_REASONS`)."""


def to_grayscale8(im: Image.Image, path: pathlib.Path | str) -> Image.Image:
    """A loaded image as 8-bit grayscale ('L'), by the rules of the module docstring; raises
    ImageError naming `path` for an image that cannot be used."""
    frames = getattr(im, 'n_frames', 1)
    if frames > 1:
        raise ImageError(BAD_SHAPE, f'{path} holds {frames} frames; expected one image')
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        gray = im.convert('L')
        pixels = np.asarray(gray)
    elif mode in ('I', 'F') or mode.startswith('I;16'):
        values = np.asarray(im, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            raise ImageError(
                NON_FINITE,
                f'{path} ({mode} pixels) has '
                f'{int(np.isnan(values).sum())} NaN and '
                f'{int(np.isinf(values).sum())} infinite of '
                f'{values.size} pixels',
            )
        lo, hi = float(values.min()), float(values.max())
        if lo == hi:
            raise ImageError(CONSTANT, f'{path} ({mode} pixels) is {lo:g} in every pixel')
        pixels = np.rint(255.0 * (values - lo) / (hi - lo)).astype(np.uint8)
        gray = Image.fromarray(pixels, mode='L')
    else:
        raise ImageError(
            BAD_MODE,
            f'{path} has PIL pixel format {mode!r}; expected 8-bit '
            '(L, RGB, ...) or 16/32-bit integer or float grayscale',
        )
    if pixels.min() == pixels.max():
        raise ImageError(CONSTANT, f'{path} is {int(pixels.min())} in every pixel')
    return gray


def encode_png(path: pathlib.Path, resolution: int) -> bytes:
    """Reads an image (any format PIL reads, whatever its extension), returns it resized as an
    8-bit grayscale PNG (`to_grayscale8`); raises ImageError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            gray = to_grayscale8(im, path)
    except ImageError:
        raise
    except Exception as e:  # UnidentifiedImageError, truncated data (OSError), SyntaxError, ...
        raise ImageError(UNREADABLE, f'{path} cannot be decoded ({type(e).__name__}: {e})') from e
    # BOX resampling averages source pixels: no aliasing when shrinking 1024 -> 224.
    gray = gray.resize((resolution, resolution), Image.Resampling.BOX)
    buf = io.BytesIO()
    gray.save(buf, format='PNG')
    return buf.getvalue()


def check_splits(
    entries: dict[str, np.ndarray],
    is_test: np.ndarray,
    official: bool,
    images: dict[str, pathlib.Path],
    csv_path: pathlib.Path,
    manual_dir: pathlib.Path,
) -> None:
    """DataError unless some CSV row names an image that is there and both splits have rows."""
    names = entries['image_index']
    if not np.isin(names, list(images)).any():
        raise errors.DataError(
            f'{csv_path}: none of its {len(names)} rows names an image found under {manual_dir} '
            f'({len(images)} PNG files there, e.g. {sorted(images)[0]}; the CSV names e.g. '
            f'{names[0]}).'
        )
    for split, rows in (('train', ~is_test), ('test', is_test)):
        if rows.any():
            continue
        if official:
            where = manual_dir / 'test_list.txt'
            problem = 'names none of' if split == 'test' else 'names every one of'
            raise errors.DataError(
                f'{where}: {problem} the {len(names)} images of {csv_path}, '
                f'so the {split} split would be empty.'
            )
        raise errors.DataError(
            f'{csv_path}: {len(np.unique(entries["patient_id"]))} patient(s) are too few for the '
            f'seeded {_FALLBACK_TEST_FRACTION:.0%} test split (the {split} split would be '
            'empty); add test_list.txt and train_val_list.txt.'
        )


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
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(r, r, 1), encoding_format='png'),
                    'label': tfds.features.Tensor(
                        shape=(len(nih_metadata.CXR_LABELS),), dtype=np.uint8
                    ),
                    'image_index': tfds.features.Text(),
                    'patient_id': np.int64,
                    'follow_up': np.int32,
                    'age': np.int32,
                    'sex': tfds.features.ClassLabel(names=list(nih_metadata.SEXES)),
                    'view': tfds.features.ClassLabel(names=list(nih_metadata.VIEWS)),
                }
            ),
            homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
            citation='Wang et al., ChestX-ray8: Hospital-scale Chest X-ray Database and '
            'Benchmarks, CVPR 2017.',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
        csv_path = find_csv(manual_dir)
        entries = nih_metadata.read_data_entry_csv(csv_path)
        images = find_images(manual_dir)
        is_test, official = split_of(entries, manual_dir)
        check_splits(entries, is_test, official, images, csv_path, manual_dir)
        self._manual_dir = manual_dir
        self.info.metadata['official_split'] = official
        self.info.metadata['label_names'] = list(nih_metadata.CXR_LABELS)
        self._skipped: dict[str, list[str]] = {}
        return {
            'train': self._generate_examples(entries, ~is_test, images, 'train'),
            'test': self._generate_examples(entries, is_test, images, 'test'),
        }

    def _generate_examples(self, entries, keep, images, split):
        r = self.builder_config.resolution
        tag = f'nih_chestxray14/{split}'
        skipped = self._skipped.setdefault(split, [])
        reasons = []
        for i in np.flatnonzero(keep):
            name = str(entries['image_index'][i])
            path = images.get(name)
            try:
                if path is None:
                    raise ImageError(
                        MISSING,
                        f'{name} is not under {self._manual_dir} (images/, '
                        'images_*/images/, images_*/)',
                    )
                png = encode_png(path, r)
            except ImageError as e:
                reasons.append(e.reason)
                skipped.append(f'{name} ({e.reason})')
                n = reasons.count(e.reason)
                if n <= _WARNINGS_PER_REASON:
                    logging.warning('%s: skipping %s: %s: %s', tag, name, e.reason, e)
                if n == _WARNINGS_PER_REASON:
                    logging.warning(
                        '%s: further images skipped for %s are counted, not logged', tag, e.reason
                    )
                continue
            yield (
                name,
                {
                    'image': png,
                    'label': entries['labels'][i],
                    'image_index': name,
                    'patient_id': int(entries['patient_id'][i]),
                    'follow_up': int(entries['follow_up'][i]),
                    'age': int(entries['age'][i]),
                    'sex': str(entries['sex'][i]),
                    'view': str(entries['view'][i]),
                },
            )
        # Runs once the split's examples are exhausted: the end-of-split report.
        counts = errors.count_reasons(reasons)
        self.info.metadata[f'skipped_{split}'] = len(skipped)
        self.info.metadata[f'skipped_{split}_by_reason'] = counts
        total = int(keep.sum())
        if skipped and len(skipped) == total:
            raise errors.DataError(
                f'{tag}: none of the {total} images of the split can be used '
                f'({errors.reasons_text(counts)}); the first: {skipped[0]}'
            )
        if skipped:
            shown = ', '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else '')
            message = (
                f'{tag}: skipped {len(skipped)} of {total} images '
                f'({errors.reasons_text(counts)}): {shown}'
            )
            logging.warning(message)
            print(message)
