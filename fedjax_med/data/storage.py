"""Storage dtypes of images and labels, from the data source to the device, and their one decode.

Every array a run keeps -- on the host and on the device, training and test -- is compact:

  chest X-ray image   uint8, value v standing for v / 255 in [0, 1] (`CXR_SCALE`): the 8-bit
                      precision of the PNGs the images come from (rounding costs <= 0.5 / 255)
  MRI image           float16: z-scored intensities are signed and unbounded, and float16 is what
                      the BraTS builders store (relative rounding <= 2^-11)
  label               uint8, exact: CXR multi-hot findings and BraTS WT/TC/ET region masks

Real NIH ChestX-ray14 at 224 px (112,120 images) is thus 5.6 GB rather than 22.5 GB float32.
`encode` makes the compact arrays on the host, after any float processing (the acquisition shift
models a hospital's scanner writing 8-bit images, so it comes before the rounding). `decode`
turns a batch back into float32 and is the only place that does: inside the jitted round right
after a local step gathers its batch (client.py), inside the jitted evaluation per batch
(evaluation.py), and on the host for figures. It follows the dtype alone (uint8 images are
scaled, anything else is cast), so float32 arrays pass through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CXR_SCALE = 255  # a stored CXR pixel v stands for v / CXR_SCALE
IMAGE_DTYPES = {'chestxray14': np.dtype(np.uint8), 'brats': np.dtype(np.float16)}
LABEL_DTYPE = np.dtype(np.uint8)


def encode_images(task: str, images: np.ndarray) -> np.ndarray:
    """Float images (CXR in [0, 1], MRI z-scored) -> the task's storage dtype; arrays already in
    it are returned as they are (real datasets are read in their stored dtype)."""
    images = np.asarray(images)
    dtype = IMAGE_DTYPES[task]
    if images.dtype == dtype:
        return images
    if dtype == np.uint8:
        return np.rint(np.clip(images, 0.0, 1.0) * CXR_SCALE).astype(np.uint8)
    return images.astype(dtype)


def encode(task: str, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A split's 'image' and 'label' in their storage dtypes; the other arrays unchanged."""
    return {
        **split,
        'image': encode_images(task, split['image']),
        'label': np.asarray(split['label']).astype(LABEL_DTYPE),
    }


def decode_images(images: Any) -> Any:
    """Stored images (numpy or jax) -> float32 model inputs: uint8 scaled by 1 / CXR_SCALE."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / CXR_SCALE
    return images.astype(np.float32)


def decode(batch: dict) -> dict:
    """A batch's 'image' and 'label' as float32 (numpy or jax, traceable); other keys unchanged."""
    return {
        **batch,
        'image': decode_images(batch['image']),
        'label': batch['label'].astype(np.float32),
    }
