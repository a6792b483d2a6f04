"""Canaries for the one-run privacy audit (`config.audit`; privacy/auditing.py has the method).

`make_canaries` draws `audit.num_canaries` examples for hospital `audit.hospital` and which of them
it trains on: each independently with probability 1/2. `plant` appends the included ones to that
hospital's training split, so they are ordinary training examples from then on: they count in
the hospital's n_k (its Poisson rate q_k = B / n_k, its local steps and its aggregation weight),
and the accountant's epsilon covers them as it covers every example. The excluded canaries are
never trained on; the auditor scores all m on the released model.

Canary kinds (`audit.canary`), in the split's storage dtypes (data/storage.py):
  'noise'    a random pixel pattern (uint8 X-rays: uniform 0..255; float16 MRI: N(0, 1) per
             voxel, the z-scored range) and a random label: for CXR one finding drawn
             uniformly of the 14 (memorised faster than a random set of findings: audit bounds
             1.31 against 0.52 after 3 rounds of 20 local epochs of a 2-hospital, 16 px smoke
             run), for BraTS masks whose every element is 1 with probability 1/2;
  'flipped'  a copy of one of the hospital's own training images (drawn uniformly, with
             replacement only if m exceeds its examples) with every label element flipped
             (1 - label): a mislabelled duplicate. The original stays in the training data
             whether the canary is included or not.
Canaries unlike the data (noise) are the easiest of the two to memorise, so they give a
black-box attacker its better chance; flipped duplicates are closer to a real mislabelled
record. Neither is a worst case: the audit's bound is only as large as the attack makes it.

Randomness: the canaries come from `[seed, streams.DATA_CANARIES]` and the inclusion bits from
`[seed, streams.DATA_CANARY_IN]`, so changing the kind never changes which canaries are in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedjax_med import streams

KINDS = ('noise', 'flipped')


@dataclasses.dataclass(frozen=True)
class Canaries:
    """m canaries of one hospital: 'image' and 'label' [m, ...] in storage dtypes, `included`
    bool [m] (trained on), `hospital` (its index), `num_real` (its training examples before the
    canaries were planted: rows 0..num_real-1 of its planted split are its own data)."""

    image: np.ndarray
    label: np.ndarray
    included: np.ndarray
    hospital: int
    num_real: int

    @property
    def num(self) -> int:
        return len(self.included)


def enabled(config) -> bool:
    """Whether the run plants canaries (`config.audit.num_canaries > 0`; a config without an
    audit section plants none)."""
    audit = config.get('audit') if hasattr(config, 'get') else None
    return bool(audit is not None and audit.get('num_canaries', 0) > 0)


def make_canaries(audit_config, train_splits: list[dict], seed: int) -> Canaries:
    """The run's canaries for `train_splits[audit.hospital]` (see the module docstring)."""
    m, h, kind = int(audit_config.num_canaries), int(audit_config.hospital), audit_config.canary
    split = train_splits[h]
    image, label = np.asarray(split['image']), np.asarray(split['label'])
    rng = np.random.default_rng([seed, streams.DATA_CANARIES])
    if kind == 'noise':
        shape = (m, *image.shape[1:])
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            pixels = rng.integers(info.min, int(info.max) + 1, shape, dtype=image.dtype)
        else:
            pixels = rng.standard_normal(shape).astype(image.dtype)
        if label.ndim == 2:  # multi-label classification: one random finding each
            labels = np.eye(label.shape[1], dtype=label.dtype)[rng.integers(0, label.shape[1], m)]
        else:  # segmentation: every mask element 1 with probability 1/2
            labels = (rng.random((m, *label.shape[1:])) < 0.5).astype(label.dtype)
    elif kind == 'flipped':
        if not len(image):
            raise ValueError(
                f"config.audit.canary='flipped' copies hospital {h}'s training images, "
                'but it has none; use a hospital with data or config.audit.canary=noise.'
            )
        rows = rng.choice(len(image), m, replace=m > len(image))
        pixels = image[rows].copy()
        labels = (1 - label[rows]).astype(label.dtype)
    else:
        raise ValueError(f'config.audit.canary={kind!r} is not known; use one of {KINDS}.')
    included = np.random.default_rng([seed, streams.DATA_CANARY_IN]).random(m) < 0.5
    return Canaries(pixels, labels, included, h, len(image))


def plant(train_splits: list[dict], canaries: Canaries) -> list[dict]:
    """The training splits with the included canaries appended to their hospital's split (a new
    list and a new dict for that hospital; the inputs are not changed). Metadata columns get
    placeholders: patient_id -1, -2, ... (a patient of its own each), zeros elsewhere, and the
    hospital's index in 'hospital'."""
    h, keep = canaries.hospital, canaries.included
    split = train_splits[h]
    n_in = int(keep.sum())
    planted = {}
    for key, column in split.items():
        column = np.asarray(column)
        if key == 'image':
            extra = canaries.image[keep]
        elif key == 'label':
            extra = canaries.label[keep]
        elif key == 'patient_id':
            extra = -np.arange(1, n_in + 1, dtype=column.dtype)
        elif key == 'hospital':
            extra = np.full(n_in, h, column.dtype)
        else:
            extra = np.zeros((n_in, *column.shape[1:]), column.dtype)
        planted[key] = np.concatenate([column, extra.astype(column.dtype)])
    return [planted if k == h else s for k, s in enumerate(train_splits)]
