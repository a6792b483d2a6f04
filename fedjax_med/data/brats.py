"""TFDS builder for brain-tumour MRI: BraTS 2020, BraTS 2021 and MSD Task01_BrainTumour.

Each labelled case is read as the four modalities (FLAIR, T1, T1ce, T2), each z-scored inside the
brain mask (non-zero voxels of the skull-stripped scans) and 0 outside, plus the WT/TC/ET region
targets made from the release's own label convention (`mri.seg_to_regions`). Volumes are
reoriented with `nib.as_closest_canonical` (RAS+), so slices are axial whatever the stored axis
order. Slices are shown with anterior at the top (rows) and the patient's left at the left
(columns). Two modes (`BratsConfig(volumes=...)`):

- 2-D (default): one example per axial slice, resized to R x R.
- 3-D (`volumes=True`, config names end in `_vol`): one example per case, the whole volume
  [Z', R, R, 4] as float16 with its labels [Z', R, R] and regions [Z', R, R, 3] as uint8 (zlib).
  Axial planes are resized to R x R as in 2-D; the axial axis, cropped to the slices with brain, is
  resampled to Z' slices so that voxels keep the physical aspect of the scan (BraTS, 240 x 240 at
  1 mm, at R = 128: 1.875 mm voxels, Z' of about 75 from about 140 slices with brain).
  `sources.load_federated` cuts 3-D patches from these volumes (`data.patch_size`,
  `data/patches.py`), one case in memory at a time.

Layouts (in the manual dir, searched recursively):
- 'brats2020' / 'brats2021': one folder per case, `<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]`, labels
  0/1/2/4 (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing).
- 'msd_brain': `imagesTr/*.nii.gz` 4-D (channels FLAIR, T1w, t1gd, T2w as in dataset.json),
  `labelsTr/*.nii.gz`, `dataset.json`; labels 1 oedema, 2 non-enhancing tumour, 3 enhancing.

Every file of every case is validated before anything of the case is stored (`load_case`), and a
case that fails is skipped under one of these reasons (`SKIP_REASONS`):

  missing file        a modality, the segmentation or the MSD image is absent
  unreadable file     nibabel cannot read it (a truncated or corrupt .nii.gz, not NIfTI)
  unexpected dtype    voxels that are not numbers (an RGB or complex NIfTI)
  unexpected shape    not a 3-D volume (MSD: 4-D with 4 channels), modalities or segmentation
                      of different shapes
  non-finite values   a NaN or infinite voxel in any image or the segmentation (z-scoring would
                      make the whole channel NaN), or a stored value that is not finite
  all-zero case       every modality is 0 everywhere: no brain, nothing to slice
  constant modality   a modality with a single value over the whole brain: no contrast
  other error         any other OSError / ValueError while making the case's examples

Each skipped case is logged as a warning naming its file when it is met; at the end the builder
prints the count per reason and stores `skipped_cases` (one 'case (why, which file)' per case) and
`skipped_by_reason` (reason -> count) in the dataset metadata. No NaN or infinite value is stored.
Two faults stop the build with a `DataError` (one line) instead: a segmentation with a label
outside the release's convention (e.g. BraTS 2023's enhancing tumour = 3 in a 'brats2021' build,
`mri.check_labels`: every case would be wrong), and a manual dir in which no case is usable.
Everything is one 'train' split (only training cases are labelled); load_federated splits it by
case.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fedjax_med.data import errors, mri
from fedjax_med.data.registry import BRATS_VERSIONS

# Names of MSD channels (dataset.json 'modality') for our FLAIR, T1, T1ce, T2 order.
_MSD_CHANNELS = (('flair',), ('t1w', 't1'), ('t1gd', 't1ce', 't1c'), ('t2w', 't2'))

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
BraTS 2020 / 2021: register at https://www.synapse.org (BraTS challenge pages) or the CBICA IPP,
download the training data and extract it into the manual dir (folders BraTS20_Training_001/ ... or
BraTS2021_00000/ ..., each with <case>_flair/_t1/_t1ce/_t2/_seg.nii[.gz]).
MSD brain tumour: download Task01_BrainTumour.tar from http://medicaldecathlon.com and extract it
(imagesTr/, labelsTr/, dataset.json).
Then: python -m fedjax_med.data.build --dataset=brats2020|brats2021|msd_brain --manual_dir=DIR
"""


class BratsConfig(tfds.core.BuilderConfig):
    """Which release (`release`), the stored in-plane resolution, 2-D slices or 3-D volumes, and
    which slices are kept.

    brain_slices_only drops axial slices without brain (3-D: crops the volume to them);
    empty_slice_stride keeps every k-th brain slice without tumour (k > 1 oversamples tumour slices
    relative to the rest; 2-D only, 3-D patches oversample tumour when they are cut).
    """

    def __init__(
        self,
        *,
        version: str = 'brats2020',
        resolution: int = 128,
        brain_slices_only: bool = True,
        empty_slice_stride: int = 1,
        volumes: bool = False,
        **kwargs,
    ):
        if version not in BRATS_VERSIONS:
            raise ValueError(f'Unknown BraTS version {version!r}; use one of {BRATS_VERSIONS}.')
        if volumes and empty_slice_stride != 1:
            raise ValueError(
                f'empty_slice_stride={empty_slice_stride} thins 2-D slices; 3-D '
                'volumes keep every slice. Set it to 1 with volumes=True.'
            )
        name = f'{version}_r{resolution}'
        if not brain_slices_only:
            name += '_all'
        if empty_slice_stride != 1:
            name += f'_e{empty_slice_stride}'
        if volumes:
            name += '_vol'
        kind = '3-D volumes' if volumes else 'axial slices'
        super().__init__(name=name, description=f'{version}, {resolution}px {kind}', **kwargs)
        self.release = version
        self.resolution = resolution
        self.brain_slices_only = brain_slices_only
        self.empty_slice_stride = empty_slice_stride
        self.volumes = volumes


# ---------------------------------------------------------------------------------------------
# Finding cases
# ---------------------------------------------------------------------------------------------


def _nifti(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for ext in ('.nii.gz', '.nii'):
        if (folder / (stem + ext)).exists():
            return folder / (stem + ext)
    return None


def find_brats_cases(manual_dir: pathlib.Path) -> list[dict]:
    """Per-case folders holding `<case>_flair.nii[.gz]`; returns dicts of paths (None if absent)."""
    cases = []
    folders = sorted({p.parent for p in manual_dir.rglob('*_flair.nii*')})
    for folder in folders:
        case = folder.name
        paths = {m: _nifti(folder, f'{case}_{m}') for m in (*mri.MODALITIES, 'seg')}
        if paths['seg'] is None:
            # BraTS 2020 case 355 ships its segmentation under another name.
            other = sorted(folder.glob('*[Ss]eg*.nii*'))
            paths['seg'] = other[0] if other else None
        cases.append({'case_id': case, 'folder': folder, **paths})
    if not cases:
        raise FileNotFoundError(
            f'No BraTS case folders (<case>/<case>_flair.nii[.gz]) under '
            f'{manual_dir}.\n' + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    return cases


def msd_channel_order(dataset_json: dict) -> list[int]:
    """Channel index of FLAIR, T1, T1ce, T2 in the MSD 4-D images, from dataset.json."""
    names = {int(k): v.lower().replace('-', '') for k, v in dataset_json['modality'].items()}
    order = []
    for aliases in _MSD_CHANNELS:
        match = [k for k, v in names.items() if v in aliases]
        if len(match) != 1:
            raise ValueError(
                f'dataset.json modality {dataset_json["modality"]} lacks one of {aliases}.'
            )
        order.append(match[0])
    return order


def find_msd_cases(manual_dir: pathlib.Path) -> tuple[list[dict], list[int]]:
    found = sorted(manual_dir.rglob('dataset.json'))
    if not found:
        raise FileNotFoundError(
            f'No dataset.json under {manual_dir}.\n' + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    root = found[0].parent
    meta = json.loads(found[0].read_text())
    cases = []
    for item in meta['training']:
        image, label = root / item['image'], root / item['label']
        case = image.name.split('.')[0]
        cases.append(
            {
                'case_id': case,
                'image': image if image.exists() else None,
                'seg': label if label.exists() else None,
                'listed': {'image': image, 'segmentation': label},
            }
        )
    if not cases:
        raise FileNotFoundError(f'{found[0]} lists no training cases.')
    return cases, msd_channel_order(meta)


def case_number(case_id: str) -> int:
    """Integer patient id from a case id ('BraTS20_Training_001' -> 1, 'BRATS_484' -> 484)."""
    digits = re.findall(r'\d+', case_id)
    # No digits: a stable hash (Python's hash() of a str changes from process to process).
    return int(digits[-1]) if digits else zlib.crc32(case_id.encode()) % (2**31)


# ---------------------------------------------------------------------------------------------
# One case -> slices
# ---------------------------------------------------------------------------------------------

MISSING = 'missing file'
UNREADABLE = 'unreadable file'
BAD_DTYPE = 'unexpected dtype'
BAD_SHAPE = 'unexpected shape'
NON_FINITE = 'non-finite values'
ALL_ZERO = 'all-zero case'
CONSTANT = 'constant modality'
OTHER = 'other error'
SKIP_REASONS = (MISSING, UNREADABLE, BAD_DTYPE, BAD_SHAPE, NON_FINITE, ALL_ZERO, CONSTANT, OTHER)


class CaseError(errors.SkippedInput):
    """A case that cannot be used: skipped, counted under `reason` (one of `SKIP_REASONS`), and
    reported with the detail, which names the offending file."""


def _nonfinite_text(data: np.ndarray) -> str | None:
    """'3 NaN and 1 infinite of 1536 voxels', or None when every value is finite."""
    if np.isfinite(data).all():
        return None
    nan = int(np.isnan(data).sum())
    inf = int(np.isinf(data).sum())
    return f'{nan} NaN and {inf} infinite of {data.size} voxels'


def read_nifti(path: pathlib.Path, what: str, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """One NIfTI file of a case (`what`: 'flair', ..., 'segmentation', 'image') in RAS+ as float32,
    with its affine; trailing axes of length 1 beyond `ndim` are dropped.

    Raises CaseError naming the file when it cannot be read (a truncated or corrupt .nii.gz: an
    EOFError or zlib error inside nibabel), holds no numbers (RGB, complex), is not `ndim`-D, or
    holds a NaN or infinite voxel (values beyond float32's range count as infinite).
    """
    import nibabel as nib

    try:
        image = nib.load(os.fspath(path))
        dtype = image.get_data_dtype()
        if dtype.kind not in 'biuf':
            raise CaseError(
                BAD_DTYPE,
                f'{what} {path} has voxels of dtype {dtype}; expected '
                'integer or floating-point intensities',
            )
        data, affine = mri.canonical_array(image)
    except CaseError:
        raise
    except Exception as e:  # EOFError, zlib.error, nibabel's ImageFileError, OSError, ...
        raise CaseError(
            UNREADABLE, f'{what} {path} cannot be read ({type(e).__name__}: {e})'
        ) from e
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim or 0 in data.shape:
        raise CaseError(
            BAD_SHAPE, f'{what} {path} has shape {data.shape}; expected a {ndim}-D volume'
        )
    bad = _nonfinite_text(data)
    if bad:
        raise CaseError(NON_FINITE, f'{what} {path} has {bad}')
    return data, affine


def _case_place(case: dict) -> str:
    """Where a case's files are, for messages: its folder (BraTS) or its 4-D image (MSD)."""
    if case.get('folder') is not None:
        return str(case['folder'])
    return str(case.get('image') or case.get('listed', {}).get('image') or case.get('case_id'))


# Long on purpose: each check that can skip a case (missing, unreadable, misshapen, non-finite,
# blank) is a few lines, in the order the files are read, so a skipped case names its reason.
def load_case(case: dict, version: str, msd_order: list[int] | None = None):
    """Returns (volume float32 [X, Y, Z, 4] z-scored in brain, seg int [X, Y, Z], brain [X,Y,Z],
    voxel size float [3] in mm along X, Y, Z), every value finite.

    Raises CaseError (the case is skipped; see the module docstring for the reasons) or
    mri.LabelError (the build stops) for a segmentation with labels outside the release's
    convention, e.g. BraTS 2023's enhancing tumour = 3.
    """
    case_id = case.get('case_id')
    if version == 'msd_brain':
        listed = case.get('listed', {})
        missing = [
            f'{what} {listed.get(what, "")}'.strip()
            for what, key in (('image', 'image'), ('segmentation', 'seg'))
            if case.get(key) is None
        ]
        if missing:
            raise CaseError(MISSING, f'no {" and no ".join(missing)} (listed in dataset.json)')
        data, _ = read_nifti(case['image'], 'image', ndim=4)
        if data.shape[-1] < 4:
            raise CaseError(
                BAD_SHAPE,
                f'image {case["image"]} has shape {data.shape}; expected '
                'a 4-D image with 4 channels',
            )
        volume = data[..., msd_order]
        sources = {
            m: f'{m} (channel {c}) of {case["image"]}'
            for m, c in zip(mri.MODALITIES, msd_order, strict=True)
        }
    else:
        missing = [m for m in (*mri.MODALITIES, 'seg') if case.get(m) is None]
        if missing:
            where = case.get('folder', '')
            names = ', '.join(f'{case_id}_{m}.nii[.gz]' for m in missing)
            raise CaseError(MISSING, f'no {", ".join(missing)} file in {where} (expected {names})')
        channels = [read_nifti(case[m], m)[0] for m in mri.MODALITIES]
        shapes = {c.shape for c in channels}
        if len(shapes) != 1:
            shown = ', '.join(
                f'{m} {c.shape}' for m, c in zip(mri.MODALITIES, channels, strict=True)
            )
            raise CaseError(
                BAD_SHAPE, f'modality shapes differ in {case.get("folder", "")}: {shown}'
            )
        volume = np.stack(channels, axis=-1)
        sources = {m: f'{m} {case[m]}' for m in mri.MODALITIES}
    seg, affine = read_nifti(case['seg'], 'segmentation')
    seg = np.rint(seg).astype(np.int64)
    if seg.shape != volume.shape[:3]:
        raise CaseError(
            BAD_SHAPE,
            f'segmentation {case["seg"]} has shape {seg.shape}, the images {volume.shape[:3]}',
        )
    mri.check_labels(
        seg, 'msd' if version == 'msd_brain' else 'brats', f'case {case_id} ({case["seg"]})'
    )
    brain = np.any(volume != 0, axis=-1)
    if not brain.any():
        raise CaseError(
            ALL_ZERO, f'every modality in {_case_place(case)} is 0 in every voxel (no brain)'
        )
    for c, m in enumerate(mri.MODALITIES):
        inside = volume[..., c][brain]
        if inside.min() == inside.max():
            raise CaseError(
                CONSTANT,
                f'{sources[m]} is {inside.min():g} in all {inside.size} brain voxels (no contrast)',
            )
    volume = mri.zscore_in_mask(volume[None], brain[None])[0]
    bad = _nonfinite_text(volume)
    if bad:  # intensities so large that float32 sums overflow
        raise CaseError(NON_FINITE, f'z-scoring {_case_place(case)} gives {bad}')
    spacing = np.sqrt(np.sum(np.square(affine[:3, :3]), axis=0))
    return volume, seg, brain, spacing


def _resize(plane: np.ndarray, resolution: int, nearest: bool) -> np.ndarray:
    im = Image.fromarray(
        plane.astype(np.uint8 if nearest else np.float32), mode='L' if nearest else 'F'
    )
    im = im.resize(
        (resolution, resolution), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    )
    return np.asarray(im)


def to_display(plane: np.ndarray) -> np.ndarray:
    """RAS+ axial plane [X, Y, ...] -> rows anterior->posterior, columns x (left->right)."""
    return np.swapaxes(plane, 0, 1)[::-1]


def case_slices(
    volume,
    seg,
    brain,
    *,
    version: str,
    resolution: int,
    brain_slices_only: bool,
    empty_slice_stride: int,
):
    """Yields (slice_index, image float16 [R, R, 4], seg uint8 [R, R], regions uint8 [R, R, 3])."""
    convention = 'msd' if version == 'msd_brain' else 'brats'
    empty_seen = 0
    for z in range(volume.shape[2]):
        if brain_slices_only and not brain[:, :, z].any():
            continue
        has_tumour = bool((seg[:, :, z] > 0).any())
        if not has_tumour:
            empty_seen += 1
            if (empty_seen - 1) % empty_slice_stride:
                continue
        planes = [_resize(to_display(volume[:, :, z, c]), resolution, False) for c in range(4)]
        label = _resize(to_display(seg[:, :, z]), resolution, True)
        regions = mri.seg_to_regions(label, convention).astype(np.uint8)
        yield z, np.stack(planes, -1).astype(np.float16), label.astype(np.uint8), regions


def _resize_axial(stack: np.ndarray, depth: int, nearest: bool) -> np.ndarray:
    """Resamples axis 0 of [Z, ...] to `depth` with PIL's filter (as `_resize` in-plane): one
    image [Z, everything else], so the other axes are left exactly as they are."""
    flat = stack.reshape(stack.shape[0], -1)
    im = Image.fromarray(
        flat.astype(np.uint8 if nearest else np.float32), mode='L' if nearest else 'F'
    )
    im = im.resize(
        (flat.shape[1], depth), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    )
    return np.asarray(im).reshape(depth, *stack.shape[1:])


def case_volume(
    volume, seg, brain, spacing, *, version: str, resolution: int, brain_slices_only: bool
) -> dict[str, np.ndarray | int]:
    """One case as a 3-D volume of axial planes (see the module docstring).

    Returns the volume features: 'image' float16 [Z', R, R, 4], 'seg' uint8 [Z', R, R] (the
    release's labels), 'label' uint8 [Z', R, R, 3] (WT/TC/ET), 'first_slice' (the first canonical
    axial slice kept) and 'spacing' float32 [3] (voxel size in mm along Z', rows, columns).
    """
    with_brain = np.flatnonzero(brain.any(axis=(0, 1)))
    if not len(with_brain):
        raise CaseError(ALL_ZERO, 'no brain voxels (all modalities are zero)')
    first, last = (with_brain[0], with_brain[-1]) if brain_slices_only else (0, volume.shape[2] - 1)
    zs = range(first, last + 1)
    planes = np.stack(
        [
            np.stack(
                [_resize(to_display(volume[:, :, z, c]), resolution, False) for c in range(4)], -1
            )
            for z in zs
        ]
    )
    labels = np.stack([_resize(to_display(seg[:, :, z]), resolution, True) for z in zs])
    # Displayed rows run along Y, columns along X.
    row_mm = volume.shape[1] * spacing[1] / resolution
    col_mm = volume.shape[0] * spacing[0] / resolution
    depth = max(1, int(round(len(zs) * spacing[2] / ((row_mm + col_mm) / 2))))
    planes = _resize_axial(planes, depth, nearest=False)
    labels = _resize_axial(labels, depth, nearest=True)
    convention = 'msd' if version == 'msd_brain' else 'brats'
    regions = mri.seg_to_regions(labels, convention).astype(np.uint8)
    return {
        'image': planes.astype(np.float16),
        'seg': labels.astype(np.uint8),
        'label': regions,
        'first_slice': int(first),
        'spacing': np.array([len(zs) * spacing[2] / depth, row_mm, col_mm], np.float32),
    }


class Brats(tfds.core.GeneratorBasedBuilder):
    """Brain-tumour MRI slices or volumes with WT/TC/ET targets (BraTS 2020, 2021, MSD Task01)."""

    name = 'brats'
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [
        BratsConfig(version=v, resolution=r) for v in BRATS_VERSIONS for r in (128, 64)
    ] + [BratsConfig(version=v, resolution=128, volumes=True) for v in BRATS_VERSIONS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        if self.builder_config.volumes:
            return tfds.core.DatasetInfo(
                builder=self,
                description='Multi-modal brain-tumour MRI as 3-D volumes (one per case).',
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Tensor(
                            shape=(None, r, r, 4), dtype=np.float16, encoding='zlib'
                        ),
                        'seg': tfds.features.Tensor(
                            shape=(None, r, r), dtype=np.uint8, encoding='zlib'
                        ),
                        'label': tfds.features.Tensor(
                            shape=(None, r, r, 3), dtype=np.uint8, encoding='zlib'
                        ),
                        'case_id': tfds.features.Text(),
                        'patient_id': np.int64,
                        'first_slice': np.int32,
                        'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    }
                ),
                homepage='https://www.synapse.org/brats',
                metadata=tfds.core.MetadataDict(),
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description='Multi-modal brain-tumour MRI as 2-D axial slices.',
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Tensor(
                        shape=(r, r, 4), dtype=np.float16, encoding='zlib'
                    ),
                    'seg': tfds.features.Tensor(shape=(r, r), dtype=np.uint8, encoding='zlib'),
                    'label': tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, encoding='zlib'),
                    'case_id': tfds.features.Text(),
                    'patient_id': np.int64,
                    'slice_index': np.int32,
                    'has_tumor': np.int32,
                }
            ),
            homepage='https://www.synapse.org/brats',
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
        cfg = self.builder_config
        msd_order = None
        if cfg.release == 'msd_brain':
            cases, msd_order = find_msd_cases(manual_dir)
        else:
            cases = find_brats_cases(manual_dir)
        self.info.metadata['label_convention'] = 'msd' if cfg.release == 'msd_brain' else 'brats'
        self.info.metadata['modalities'] = list(mri.MODALITIES)
        self.info.metadata['regions'] = list(mri.REGIONS)
        return {'train': self._generate_examples(cases, msd_order, manual_dir)}

    def _case_examples(self, case: dict, msd_order) -> list[tuple[str, dict]]:
        """Every example of one case (one volume, or its slices); raises CaseError."""
        cfg = self.builder_config
        case_id = case['case_id']
        volume, seg, brain, spacing = load_case(case, cfg.release, msd_order)
        pid = case_number(case_id)
        if cfg.volumes:
            features = case_volume(
                volume,
                seg,
                brain,
                spacing,
                version=cfg.release,
                resolution=cfg.resolution,
                brain_slices_only=cfg.brain_slices_only,
            )
            examples = [(case_id, {**features, 'case_id': case_id, 'patient_id': pid})]
        else:
            examples = [
                (
                    f'{case_id}_{z:03d}',
                    {
                        'image': image,
                        'seg': label,
                        'label': regions,
                        'case_id': case_id,
                        'patient_id': pid,
                        'slice_index': z,
                        'has_tumor': int(regions[..., 0].any()),
                    },
                )
                for z, image, label, regions in case_slices(
                    volume,
                    seg,
                    brain,
                    version=cfg.release,
                    resolution=cfg.resolution,
                    brain_slices_only=cfg.brain_slices_only,
                    empty_slice_stride=cfg.empty_slice_stride,
                )
            ]
        for _, example in examples:  # what is stored (float16) must be finite too
            bad = _nonfinite_text(example['image'])
            if bad:
                raise CaseError(
                    NON_FINITE, f'the stored float16 image of {_case_place(case)} has {bad}'
                )
        return examples

    def _generate_examples(self, cases, msd_order, manual_dir=None):
        cfg = self.builder_config
        tag = f'brats/{cfg.name}'
        skipped, reasons = [], []
        for case in cases:
            try:
                examples = self._case_examples(case, msd_order)
            except mri.LabelError:
                raise  # a release in another label convention: every case would be wrong
            except CaseError as e:
                reason, detail = e.reason, str(e)
            except (OSError, ValueError) as e:  # anything else a broken case may raise
                reason, detail = OTHER, f'{type(e).__name__}: {e}'
            else:
                yield from examples
                continue
            logging.warning('%s: skipping case %s: %s: %s', tag, case['case_id'], reason, detail)
            skipped.append(f'{case["case_id"]} ({reason}: {detail})')
            reasons.append(reason)
        # End-of-generation report of skipped cases.
        counts = errors.count_reasons(reasons)
        self.info.metadata['skipped_cases'] = skipped
        self.info.metadata['skipped_by_reason'] = counts
        if len(skipped) == len(cases):
            raise errors.DataError(
                f'{tag}: none of the {len(cases)} cases under {manual_dir} can be used '
                f'({errors.reasons_text(counts)}); the first: {skipped[0]}'
            )
        if skipped:
            shown = '; '.join(skipped[:10]) + (' ...' if len(skipped) > 10 else '')
            message = (
                f'{tag}: skipped {len(skipped)} of {len(cases)} cases '
                f'({errors.reasons_text(counts)}): {shown}'
            )
            logging.warning(message)
            print(message)
