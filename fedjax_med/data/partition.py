"""Seeded, patient-wise partitions into K hospitals, and per-hospital acquisition shift.

Every partition works on *units* -- patients for ChestX-ray14, cases for BraTS -- and only then
expands to examples, so a patient is never in two hospitals, and `split_train_test` keeps a
patient out of both a hospital's train and test split. All functions are pure numpy and a function
of their `np.random.Generator` / seed.

Strategies (`partition_examples(strategy=...)`):
- 'iid': units shuffled and dealt into K near-equal parts.
- 'dirichlet': label skew (Hsu et al. 2019): for every class, hospital shares ~ Dir(alpha * 1_K);
  smaller alpha = more skew. Multi-label rule: a unit's class is its *primary label*, the rarest
  finding (lowest prevalence in the dataset) present in any of its images, or 'No Finding' (class
  C) if it has none -- rare findings thus decide where a patient goes, which is what makes them
  scarce in most hospitals.
- 'pathological': each hospital holds `classes_per_client` findings (dealt round-robin from a
  seeded permutation so that every finding is held when K * k >= C); units go to a random holder of
  their primary class; 'No Finding' units (the shared class) are spread over all hospitals, as are
  units of a class no hospital holds.
- 'quantity': iid labels, hospital sizes ~ LogNormal(0, sigma), every hospital >= 1 unit.
- 'natural': hospitals follow a metadata column (e.g. 'view'): a categorical column with fewer
  values than K gives each value a number of hospitals proportional to its size (>= 1) and splits
  it iid among them; with more values than K, a numeric column is cut into K contiguous quantile
  bins (e.g. age bands) and a categorical one is packed greedily (largest value first, into the
  smallest hospital).

`apply_acquisition_shift` gives each hospital a fixed scanner "look": X-ray gamma, contrast,
brightness, blur and noise; MRI per-modality scale and offset, a smooth bias field and noise (on
2-D slices, or on 3-D patches at their place in the volume).
"""

from __future__ import annotations

import numpy as np

from fedjax_med import streams
from fedjax_med.data import storage

STRATEGIES = ('iid', 'dirichlet', 'pathological', 'quantity', 'natural')


# ---------------------------------------------------------------------------------------------
# Units and classes
# ---------------------------------------------------------------------------------------------


def group_units(unit_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Example unit ids [n] -> (unique unit ids [U], index of each example's unit [n])."""
    uniq, inverse = np.unique(np.asarray(unit_ids), return_inverse=True)
    return uniq, inverse.reshape(-1)


def primary_label(labels: np.ndarray, prevalence: np.ndarray | None = None) -> np.ndarray:
    """Multi-hot [n, C] -> int64 [n] in 0..C: the rarest positive class, or C when none is set.

    `prevalence` [C] defaults to the column means of `labels`; ties go to the lower index.
    """
    labels = np.asarray(labels) > 0
    prevalence = labels.mean(0) if prevalence is None else np.asarray(prevalence, np.float64)
    rank = np.argsort(np.argsort(prevalence, kind='stable'), kind='stable')  # 0 = rarest
    c = labels.shape[1]
    ranked = np.where(labels, rank[None, :], c)
    best = ranked.min(1)
    order = np.argsort(rank, kind='stable')  # rank -> class
    return np.where(best < c, order[np.minimum(best, c - 1)], c).astype(np.int64)


def unit_primary_label(labels: np.ndarray, example_unit: np.ndarray, num_units: int) -> np.ndarray:
    """Per-unit primary label: the rarest finding in any of the unit's examples (C if none)."""
    labels = np.asarray(labels) > 0
    any_pos = np.zeros((num_units, labels.shape[1]), bool)
    np.logical_or.at(any_pos, example_unit, labels)
    return primary_label(any_pos, prevalence=labels.mean(0))


def unit_majority(values: np.ndarray, example_unit: np.ndarray, num_units: int) -> np.ndarray:
    """Per-unit most frequent value of an example-level column (ties: smallest value)."""
    uniq, codes = np.unique(np.asarray(values), return_inverse=True)
    counts = np.zeros((num_units, len(uniq)), np.int64)
    np.add.at(counts, (example_unit, codes.reshape(-1)), 1)
    return uniq[counts.argmax(1)]


# ---------------------------------------------------------------------------------------------
# Partitions of units
# ---------------------------------------------------------------------------------------------


def _split_by_sizes(units: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return [np.sort(p) for p in np.split(units, np.cumsum(sizes)[:-1])]


def _check(num_units: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f'num_clients must be >= 1, got {num_clients}.')
    if num_units < num_clients:
        raise ValueError(
            f'Cannot split {num_units} patients/cases into {num_clients} hospitals; '
            'lower data.num_clients or use more data (data.num_train).'
        )


def iid_partition(num_units: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Units shuffled and dealt into `num_clients` parts whose sizes differ by at most one."""
    _check(num_units, num_clients)
    sizes = np.full(num_clients, num_units // num_clients)
    sizes[: num_units % num_clients] += 1
    return _split_by_sizes(rng.permutation(num_units), sizes)


def quantity_partition(
    num_units: int, num_clients: int, sigma: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """IID units with hospital sizes proportional to LogNormal(0, sigma) draws (each >= 1)."""
    _check(num_units, num_clients)
    weights = rng.lognormal(0.0, sigma, num_clients)
    sizes = 1 + _largest_remainder(weights / weights.sum() * (num_units - num_clients))
    return _split_by_sizes(rng.permutation(num_units), sizes)


def _largest_remainder(quotas: np.ndarray) -> np.ndarray:
    """Rounds non-negative quotas to integers with the same (integer) total."""
    floor = np.floor(quotas).astype(np.int64)
    short = int(round(quotas.sum())) - floor.sum()
    floor[np.argsort(-(quotas - floor), kind='stable')[:short]] += 1
    return floor


def dirichlet_partition(
    unit_classes: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_units: int = 2,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split over hospitals by a Dir(alpha) draw.

    Redraws until every hospital has at least `min_units` units; if that keeps failing (tiny data,
    tiny alpha), moves units from the largest hospitals to the short ones.
    """
    unit_classes = np.asarray(unit_classes)
    _check(len(unit_classes), num_clients)
    if alpha <= 0:
        raise ValueError(f'data.dirichlet_alpha must be > 0, got {alpha}.')
    min_units = min(min_units, len(unit_classes) // num_clients)
    for _ in range(max_tries):
        owner = np.empty(len(unit_classes), np.int64)
        for c in np.unique(unit_classes):
            members = rng.permutation(np.flatnonzero(unit_classes == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            owner[members] = np.repeat(
                np.arange(num_clients), _largest_remainder(shares * len(members))
            )
        if np.bincount(owner, minlength=num_clients).min() >= min_units:
            break
    counts = np.bincount(owner, minlength=num_clients)
    while counts.min() < min_units:
        donor, taker = counts.argmax(), counts.argmin()
        owner[rng.choice(np.flatnonzero(owner == donor))] = taker
        counts = np.bincount(owner, minlength=num_clients)
    return [np.flatnonzero(owner == k) for k in range(num_clients)]


def pathological_partition(
    unit_classes: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    num_classes: int,
    rng: np.random.Generator,
    shared_class: int | None = None,
) -> list[np.ndarray]:
    """Each hospital holds `classes_per_client` of the `num_classes` classes (see module doc)."""
    unit_classes = np.asarray(unit_classes)
    _check(len(unit_classes), num_clients)
    dealt = np.asarray([c for c in range(num_classes) if c != shared_class])
    k = max(1, min(classes_per_client, len(dealt)))
    perm = rng.permutation(dealt)
    held = [perm[(i * k + np.arange(k)) % len(dealt)] for i in range(num_clients)]
    owner = rng.integers(0, num_clients, len(unit_classes))  # shared / unheld classes
    for c in range(num_classes):
        holders = [i for i in range(num_clients) if c in held[i]]
        members = np.flatnonzero(unit_classes == c)
        if holders and c != shared_class:
            owner[members] = np.asarray(holders)[rng.integers(0, len(holders), len(members))]
    parts = [np.flatnonzero(owner == i) for i in range(num_clients)]
    if min(len(p) for p in parts) == 0:
        raise ValueError(
            f'Pathological partition left a hospital empty (num_clients='
            f'{num_clients}, findings_per_client={classes_per_client}); use more '
            'data or more findings per hospital.'
        )
    return parts


def natural_partition(
    unit_values: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Hospitals defined by a metadata value per unit (see module doc)."""
    unit_values = np.asarray(unit_values)
    _check(len(unit_values), num_clients)
    values, codes, counts = np.unique(unit_values, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    owner = np.empty(len(unit_values), np.int64)
    if len(values) <= num_clients:
        quotas = counts / counts.sum() * (num_clients - len(values))
        hospitals_per_value = 1 + _largest_remainder(quotas)
        first = np.r_[0, np.cumsum(hospitals_per_value)[:-1]]
        for v in range(len(values)):
            members = np.flatnonzero(codes == v)
            for j, part in enumerate(iid_partition(len(members), hospitals_per_value[v], rng)):
                owner[members[part]] = first[v] + j
    elif np.issubdtype(unit_values.dtype, np.number):
        order = np.argsort(unit_values, kind='stable')
        bins = np.array_split(order, num_clients)
        for k, members in enumerate(bins):
            owner[members] = k
    else:
        load = np.zeros(num_clients, np.int64)
        for v in np.argsort(-counts, kind='stable'):
            k = int(load.argmin())
            owner[codes == v] = k
            load[k] += counts[v]
    return [np.flatnonzero(owner == k) for k in range(num_clients)]


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def partition_examples(
    strategy: str,
    *,
    unit_ids: np.ndarray,
    num_clients: int,
    seed: int,
    labels: np.ndarray | None = None,
    unit_classes: np.ndarray | None = None,
    num_classes: int | None = None,
    shared_class: int | None = None,
    dirichlet_alpha: float = 0.5,
    classes_per_client: int = 2,
    quantity_sigma: float = 1.0,
    column: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Example indices of each hospital, patient-wise.

    Args:
      strategy: one of `STRATEGIES`.
      unit_ids: patient (or case) id of every example [n].
      num_clients: K.
      seed: partition seed.
      labels: multi-hot [n, C]; gives every unit its primary label (dirichlet, pathological)
        unless `unit_classes` is given.
      unit_classes: int class per unit, in `np.unique(unit_ids)` order (e.g. BraTS size tertile).
      num_classes: number of classes (default C + 1 from `labels`, 'No Finding' = C).
      shared_class: pathological only, class spread over every hospital (default C with labels).
      dirichlet_alpha, classes_per_client, quantity_sigma: strategy parameters.
      column: natural only, an example-level column [n]; each unit takes its majority value.

    Returns:
      K sorted int64 arrays of example indices: disjoint, covering all n examples.
    """
    rng = np.random.default_rng([seed, streams.DATA_PARTITION])
    uniq, example_unit = group_units(unit_ids)
    num_units = len(uniq)
    if strategy in ('dirichlet', 'pathological') and unit_classes is None:
        if labels is None:
            raise ValueError(f'partition {strategy!r} needs labels or unit_classes.')
        unit_classes = unit_primary_label(labels, example_unit, num_units)
        num_classes = np.asarray(labels).shape[1] + 1 if num_classes is None else num_classes
        shared_class = np.asarray(labels).shape[1] if shared_class is None else shared_class
    if strategy == 'iid':
        parts = iid_partition(num_units, num_clients, rng)
    elif strategy == 'dirichlet':
        parts = dirichlet_partition(unit_classes, num_clients, dirichlet_alpha, rng)
    elif strategy == 'pathological':
        num_classes = int(np.max(unit_classes)) + 1 if num_classes is None else num_classes
        parts = pathological_partition(
            unit_classes, num_clients, classes_per_client, num_classes, rng, shared_class
        )
    elif strategy == 'quantity':
        parts = quantity_partition(num_units, num_clients, quantity_sigma, rng)
    elif strategy == 'natural':
        if column is None:
            raise ValueError("partition 'natural' needs a metadata column (data.natural_column).")
        parts = natural_partition(unit_majority(column, example_unit, num_units), num_clients, rng)
    else:
        raise ValueError(f'Unknown data.partition {strategy!r}; use one of {STRATEGIES}.')
    owner = np.empty(num_units, np.int64)
    for k, p in enumerate(parts):
        owner[p] = k
    example_owner = owner[example_unit]
    return [np.flatnonzero(example_owner == k) for k in range(num_clients)]


def split_train_test(
    indices: np.ndarray, unit_ids: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Splits one hospital's examples patient-wise: whole patients go to test until about
    `test_fraction` of the examples are there; at least one patient stays in train."""
    indices = np.asarray(indices)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f'data.test_fraction must be in [0, 1), got {test_fraction}.')
    uniq, example_unit = group_units(np.asarray(unit_ids)[indices])
    if test_fraction == 0.0 or len(uniq) < 2:
        return indices, indices[:0]
    sizes = np.bincount(example_unit, minlength=len(uniq))
    order = rng.permutation(len(uniq))
    cum = np.cumsum(sizes[order])
    target = test_fraction * len(indices)
    num_test_units = int(np.clip(np.searchsorted(cum, target) + 1, 1, len(uniq) - 1))
    # Take one fewer patient if that lands closer to the target.
    if num_test_units > 1 and abs(cum[num_test_units - 2] - target) <= abs(
        cum[num_test_units - 1] - target
    ):
        num_test_units -= 1
    is_test = np.zeros(len(uniq), bool)
    is_test[order[:num_test_units]] = True
    mask = is_test[example_unit]
    return indices[~mask], indices[mask]


def label_skew(parts: list[np.ndarray], classes: np.ndarray) -> float:
    """Mean total-variation distance between each hospital's class mix and the pooled mix
    (0 = identical mixes, 1 = disjoint); `classes` is an int class per example."""
    classes = np.asarray(classes)
    num_classes = int(classes.max()) + 1
    pooled = np.bincount(classes, minlength=num_classes) / len(classes)
    tv = [
        0.5 * np.abs(np.bincount(classes[p], minlength=num_classes) / max(len(p), 1) - pooled).sum()
        for p in parts
    ]
    return float(np.mean(tv))


# ---------------------------------------------------------------------------------------------
# Feature skew
# ---------------------------------------------------------------------------------------------


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over axes 1, 2 of [n, H, W, C] with reflect padding."""
    if sigma < 0.3:
        return images
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode='reflect')
        size = out.shape[axis]
        out = sum(
            w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(taps)
        )
    return out.astype(np.float32)


def acquisition_params(hospital_index: int, task: str, seed: int) -> dict[str, np.ndarray]:
    """The fixed scanner parameters of one hospital (what `apply_acquisition_shift` uses)."""
    rng = np.random.default_rng([seed, hospital_index, streams.DATA_SHIFT_PARAMS])
    if task == 'chestxray14':
        return {
            'gamma': np.exp(rng.uniform(-0.4, 0.4)),
            'contrast': rng.uniform(0.75, 1.25),
            'brightness': rng.uniform(-0.08, 0.08),
            'blur_sigma': rng.uniform(0.0, 1.2),  # pixels at 64 px; scaled with resolution
            'noise': rng.uniform(0.0, 0.04),
        }
    if task == 'brats':
        return {
            'scale': rng.uniform(0.75, 1.3, 4),
            'offset': rng.uniform(-0.25, 0.25, 4),
            'bias': rng.uniform(-0.3, 0.3, 3),  # x, y and radial coefficients of the bias field
            'noise': rng.uniform(0.0, 0.15),
        }
    raise ValueError(f"Unknown task {task!r}; use 'chestxray14' or 'brats'.")


def apply_acquisition_shift(
    images: np.ndarray,
    hospital_index: int,
    task: str,
    seed: int,
    *,
    origins: np.ndarray | None = None,
    volume_shapes: np.ndarray | None = None,
) -> np.ndarray:
    """Applies hospital `hospital_index`'s fixed acquisition "look" to images [n, H, W, C].

    Works in float32 and returns float32: images in a storage dtype (uint8 X-rays read from a
    built dataset, float16 MRI) are decoded first (`storage.decode_images`); the caller rounds
    the result to the storage dtype, as the hospital's scanner would.

    Deterministic in (images, hospital_index, task, seed). X-rays (values in [0, 1]): gamma,
    contrast, brightness, Gaussian blur, noise, clipped to [0, 1]. MRI (z-scored, background 0):
    per-modality scale and offset, a smooth multiplicative bias field and noise, inside the head
    only (background stays 0).

    MRI 3-D patches [n, D, H, W, C] get the same in-plane bias field as 2-D slices, evaluated where
    each patch lies in its volume: `origins` [n, 3] (z, y, x of the patch's first voxel) and
    `volume_shapes` [n, 3] (as `data/patches.py` records them). Without them each patch is treated
    as a whole volume.
    """
    p = acquisition_params(hospital_index, task, seed)
    images = storage.decode_images(np.asarray(images))
    if len(images) == 0:
        return images
    rng = np.random.default_rng([seed, hospital_index, streams.DATA_SHIFT_NOISE])
    res = images.shape[1]
    if task == 'chestxray14':
        out = np.clip(images, 0.0, 1.0) ** p['gamma']
        out = (out - 0.5) * p['contrast'] + 0.5 + p['brightness']
        out = _gaussian_blur(out, p['blur_sigma'] * res / 64)
        out = out + p['noise'] * rng.standard_normal(out.shape).astype(np.float32)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
    y, x = _in_plane_coordinates(images.shape, origins, volume_shapes)
    bias = 1.0 + p['bias'][0] * x + p['bias'][1] * y + p['bias'][2] * (x * x + y * y - 0.5)
    head = np.any(images != 0, axis=-1, keepdims=True)
    out = (images * p['scale'] + p['offset']) * bias[..., None]
    out = out + p['noise'] * rng.standard_normal(out.shape).astype(np.float32)
    return np.where(head, out, 0.0).astype(np.float32)


def _in_plane_coordinates(
    shape: tuple[int, ...], origins: np.ndarray | None, volume_shapes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) in [-1, 1] over the rows and columns of each image's slice or volume, broadcastable
    against images [n, H, W, C] ([H, W]) or patches [n, D, H, W, C] ([n, 1, H, W])."""
    if len(shape) == 4:
        g = lambda size: np.linspace(-1.0, 1.0, size, dtype=np.float32)
        return np.meshgrid(g(shape[1]), g(shape[2]), indexing='ij')
    n, _, h, w = shape[:4]
    if origins is None:
        origins = np.zeros((n, 3), np.int64)
        volume_shapes = np.tile(np.asarray(shape[1:4], np.int64), (n, 1))
    origins = np.asarray(origins, np.float32)
    sizes = np.maximum(np.asarray(volume_shapes, np.float32) - 1.0, 1.0)
    rows = -1.0 + 2.0 * (origins[:, 1, None] + np.arange(h, dtype=np.float32)) / sizes[:, 1, None]
    cols = -1.0 + 2.0 * (origins[:, 2, None] + np.arange(w, dtype=np.float32)) / sizes[:, 2, None]
    return rows[:, None, :, None], cols[:, None, None, :]
