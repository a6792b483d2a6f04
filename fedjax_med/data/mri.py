"""Brain-tumour MRI helpers shared by the BraTS builders and the synthetic twin.

Label conventions differ between releases, so region targets are always made here:

| version  | labels                                                   | WT      | TC    | ET  |
|----------|----------------------------------------------------------|---------|-------|-----|
| 'brats'  | BraTS 2020/2021: 1 necrotic/non-enh. core, 2 oedema, 4 enhancing | 1,2,4 | 1,4 | 4 |
| 'msd'    | MSD Task01: 1 oedema, 2 non-enhancing tumour, 3 enhancing | 1,2,3   | 2,3   | 3   |
"""

from __future__ import annotations

import os

import numpy as np

from fedjax_med.data.errors import DataError

MODALITIES: tuple[str, ...] = ('flair', 't1', 't1ce', 't2')
REGIONS: tuple[str, ...] = ('WT', 'TC', 'ET')
_REGION_LABELS = {
    'brats': ((1, 2, 4), (1, 4), (4,)),
    'msd': ((1, 2, 3), (2, 3), (3,)),
}
# Every label a segmentation of each convention may hold (0 = background).
LABELS = {'brats': (0, 1, 2, 4), 'msd': (0, 1, 2, 3)}
_CONVENTION_TEXT = {
    'brats': "the 'brats' convention of BraTS 2020/2021 (0 background, 1 necrotic / non-enhancing "
    'core, 2 oedema, 4 enhancing tumour)',
    'msd': "the 'msd' convention of MSD Task01 (0 background, 1 oedema, 2 non-enhancing tumour, "
    '3 enhancing tumour)',
}


class LabelError(DataError):
    """A segmentation in another label convention than its release's: no case can be trusted, so
    the build stops (a `DataError`, one line naming the case and its file)."""


def label_values(seg: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, sorted (bincount for small non-negative integers: far
    cheaper than np.unique's sort on a 240 x 240 x 155 volume)."""
    seg = np.asarray(seg)
    if seg.size and np.issubdtype(seg.dtype, np.integer) and 0 <= seg.min() and seg.max() < 2**16:
        return np.flatnonzero(np.bincount(seg.ravel()))
    return np.unique(seg)


def check_labels(seg: np.ndarray, version: str, source: str) -> None:
    """Raises LabelError naming `source` (the case or file) if `seg` holds a label outside the
    convention's: `seg_to_regions` would silently count it as background."""
    if version not in LABELS:
        raise ValueError(f'Unknown label convention {version!r}; use {list(LABELS)}.')
    values = label_values(seg)
    unexpected = [v.item() for v in values if v not in LABELS[version]]
    if not unexpected:
        return
    hint = (
        ' BraTS 2021 marks enhancing tumour with 4; data in the BraTS 2023 convention '
        '(enhancing tumour = 3) must be remapped (3 -> 4) before it is built.'
        if version == 'brats'
        else ''
    )
    raise LabelError(
        f'{source}: segmentation holds label(s) {unexpected} (all values: '
        f'{[v.item() for v in values]}), outside {_CONVENTION_TEXT[version]}; they '
        f'would be read as background.{hint}'
    )


def seg_to_regions(seg: np.ndarray, version: str) -> np.ndarray:
    """Integer label map [...] -> float32 binary regions [..., 3] (WT, TC, ET). Labels outside
    the convention count as background: loaders check each case first (`check_labels`)."""
    if version not in _REGION_LABELS:
        raise ValueError(f'Unknown label convention {version!r}; use {list(_REGION_LABELS)}.')
    return np.stack([np.isin(seg, labels) for labels in _REGION_LABELS[version]], axis=-1).astype(
        np.float32
    )


def zscore_in_mask(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-scores each channel of img [..., C] using only voxels where mask [...] is true.

    The leading axis is the case: statistics are per case and per modality. Outside the mask the
    result is 0 (the mean), so background carries no intensity information.
    """
    n, c = img.shape[0], img.shape[-1]
    m = mask.reshape(n, -1, 1).astype(np.float32)
    flat = img.reshape(n, -1, c)
    count = np.maximum(m.sum(1, keepdims=True), 1.0)
    mean = (flat * m).sum(1, keepdims=True) / count
    std = np.sqrt((((flat - mean) * m) ** 2).sum(1, keepdims=True) / count)
    out = (flat - mean) / np.maximum(std, 1e-6) * m
    return out.reshape(img.shape).astype(np.float32)


def load_canonical(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI file reoriented to the closest canonical (RAS+) orientation.

    Returns (data float32, affine). Reorienting with the affine, not the raw array order, makes
    'axial slice k' mean the same anatomy whatever the scanner or converter wrote.
    """
    import nibabel as nib

    return canonical_array(nib.load(os.fspath(path)))


def canonical_array(image) -> tuple[np.ndarray, np.ndarray]:
    """A loaded nibabel image reoriented to RAS+ (`load_canonical`): (data float32, affine).
    Values beyond float32's range become infinite (the caller checks that they are finite)."""
    import nibabel as nib

    image = nib.as_closest_canonical(image)
    with np.errstate(over='ignore', invalid='ignore'):
        data = np.asarray(image.dataobj, dtype=np.float32)
    return data, image.affine


def largest_tumour_slice(regions: np.ndarray) -> int:
    """Axial slice of a 3-D patch or volume's regions [D, H, W, 3] with the most whole-tumour
    voxels (the middle slice when there is no tumour): the one to show of a 3-D example."""
    area = np.asarray(regions)[..., 0].reshape(regions.shape[0], -1).sum(1)
    return int(area.argmax()) if area.max() > 0 else regions.shape[0] // 2
