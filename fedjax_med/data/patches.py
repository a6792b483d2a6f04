"""3-D patches from BraTS volumes, with nnU-Net-style foreground oversampling.

`sample_patches` cuts `num_patches` cubes of P^3 voxels from one case's volume [Z, H, W, 4] and
its region targets [Z, H, W, 3]. round(tumour_fraction * num_patches) of them are centred on a
tumour voxel: a region present in the case (WT, TC or ET) is picked uniformly, then a voxel of that
region, so small enhancing regions are seen as often as the oedema (Isensee et al. 2021,
nnU-Net). The other patches are centred on a uniformly drawn brain voxel (non-zero image; the
volumes are z-scored inside the brain and 0 outside). A case without tumour gets only brain-centred
patches. A centre near the border moves the patch inwards, so every patch lies inside the volume
and contains its centre voxel; a volume smaller than P along an axis is zero-padded at its high
end (zero is the background value).

`patches_from_cases` does this for a stream of cases, each with its own generator seeded by
(seed, patient id), so a case's patches do not depend on which other cases are read or in which
order. Every patch keeps its case's ids, so partitions and train/test splits stay by case, plus
'patch_origin' (z, y, x of its first voxel in the volume) and 'volume_shape', which place it in
its volume (the hospitals' acquisition shift uses them for a bias field over the whole head).

The patches are drawn once, when the data is loaded, and then stay fixed for the whole run (they
live on the devices like the 2-D slices), so `patches_per_case` sets how much of each volume the
model sees. Evaluation uses the test cases' patches, drawn the same way, so the dataset-level
Dice (`mean_dice`) is over those patches (tumour-oversampled; a voxel in two patches counts
twice), not over whole volumes; the per-case metrics (`mean_case_dice`, `mean_hd95`) stitch each
case's patches back into its volume at their 'patch_origin' (`metrics.stitch_patches`) and are
over the voxels the patches cover (`case_voxel_coverage`), since the full volumes are not kept.
As with 2-D slices, a patch is one example: sample-level DP-SGD protects a patch, and a case
contributes `patches_per_case` of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedjax_med import streams

_PURPOSE = streams.DATA_PATCHES  # seeds np.random.default_rng([seed, _PURPOSE, patient_id])


def case_rng(seed: int, patient_id: int) -> np.random.Generator:
    """The generator that draws one case's patches."""
    return np.random.default_rng([seed, _PURPOSE, int(patient_id)])


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads the three spatial axes [Z, H, W, ...] at their high end to at least `size`."""
    pads = [(0, max(0, size - n)) for n in array.shape[:3]]
    if not any(hi for _, hi in pads):
        return array
    return np.pad(array, pads + [(0, 0)] * (array.ndim - 3))


def _pick(rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
    """`count` voxel coordinates [count, 3] drawn uniformly (with replacement) where mask is set."""
    flat = np.flatnonzero(mask)
    chosen = flat[rng.integers(0, len(flat), count)]
    return np.stack(np.unravel_index(chosen, mask.shape), axis=-1)


def sample_patches(
    image: np.ndarray,
    regions: np.ndarray,
    *,
    patch_size: int,
    num_patches: int,
    tumour_fraction: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Cuts `num_patches` patches of patch_size^3 voxels from one case (see module docstring).

    Args:
      image: [Z, H, W, C] volume, 0 outside the brain.
      regions: [Z, H, W, 3] binary WT/TC/ET targets (any numeric dtype).
      patch_size: P, the patch side in voxels.
      num_patches: patches to cut.
      tumour_fraction: in [0, 1], fraction of patches centred on a tumour voxel.
      rng: this case's generator (`case_rng`).

    Returns:
      'image' [n, P, P, P, C] and 'label' [n, P, P, P, 3] (the input dtypes), 'patch_origin'
      int64 [n, 3] (z, y, x of the first voxel), 'centre' int64 [n, 3] (the voxel the patch was
      drawn around) and 'tumour_centred' int64 [n] (1 for the oversampled patches).
    """
    if image.shape[:3] != regions.shape[:3]:
        raise ValueError(
            f'image {image.shape} and regions {regions.shape} differ in their spatial shape.'
        )
    if not 0.0 <= tumour_fraction <= 1.0:
        raise ValueError(f'tumour_fraction={tumour_fraction} must be in [0, 1].')
    shape = np.asarray(image.shape[:3])
    present = [r for r in range(regions.shape[-1]) if regions[..., r].any()]
    num_tumour = int(round(tumour_fraction * num_patches)) if present else 0
    centres = np.empty((num_patches, 3), np.int64)
    if num_tumour:
        picked_region = rng.choice(present, num_tumour)
        for r in np.unique(picked_region):
            rows = np.flatnonzero(picked_region == r)
            centres[rows] = _pick(rng, regions[..., r] > 0, len(rows))
    brain = np.any(image != 0, axis=-1)
    if not brain.any():  # no brain voxel at all: anywhere in the volume
        brain = np.ones(brain.shape, bool)
    centres[num_tumour:] = _pick(rng, brain, num_patches - num_tumour)
    padded_shape = np.maximum(shape, patch_size)
    origins = np.clip(centres - patch_size // 2, 0, padded_shape - patch_size)
    image, regions = _pad_to(image, patch_size), _pad_to(regions, patch_size)
    cut = lambda a, o: a[
        o[0] : o[0] + patch_size, o[1] : o[1] + patch_size, o[2] : o[2] + patch_size
    ]
    return {
        'image': np.stack([cut(image, o) for o in origins]),
        'label': np.stack([cut(regions, o) for o in origins]),
        'patch_origin': origins.astype(np.int64),
        'centre': centres,
        'tumour_centred': (np.arange(num_patches) < num_tumour).astype(np.int64),
    }


def patches_from_cases(
    cases: Iterable[dict],
    *,
    patch_size: int,
    patches_per_case: int,
    tumour_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """Patches of every case in `cases`, stacked.

    Each case is a dict with 'image' [Z, H, W, C], 'label' [Z, H, W, 3] (regions), 'patient_id'
    (int) and any other per-case scalars (ids, grade), which every patch of the case repeats.
    Volumes are dropped once cut, so a stream of cases needs memory for one volume at a time.

    Returns the `sample_patches` arrays (image and label in the cases' dtypes: float16 and uint8
    from a built dataset, which `load_federated` keeps on the device) plus the per-case
    scalars, 'patch_index' (0..patches_per_case-1 within the case), 'volume_shape' int64 [n, 3]
    and 'has_tumor' (1 if the patch holds a WT voxel).
    """
    parts: dict[str, list[np.ndarray]] = {}
    for case in cases:
        volume = np.asarray(case['image'])
        drawn = sample_patches(
            volume,
            np.asarray(case['label']),
            patch_size=patch_size,
            num_patches=patches_per_case,
            tumour_fraction=tumour_fraction,
            rng=case_rng(seed, case['patient_id']),
        )
        drawn['patch_index'] = np.arange(patches_per_case, dtype=np.int64)
        drawn['volume_shape'] = np.tile(
            np.asarray(volume.shape[:3], np.int64), (patches_per_case, 1)
        )
        drawn['has_tumor'] = (
            drawn['label'][..., 0].reshape(patches_per_case, -1).max(1) > 0
        ).astype(np.int64)
        for key, value in case.items():
            if key not in ('image', 'label'):
                drawn[key] = np.repeat(np.asarray(value)[None], patches_per_case, axis=0)
        for key, value in drawn.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError('No cases to cut patches from.')
    return {k: np.concatenate(v) for k, v in parts.items()}
