"""Making, building and reading the TFDS datasets of fedjax_med (array_record, no TensorFlow).

`make_builder(name, ...)` returns the builder for a `data.name`, `ensure_built` prepares it once
into the data dir (from the manual dir for real datasets), and `read_split` reads a split through
`builder.as_data_source()` into numpy arrays in the `FederatedDataset` conventions. BraTS in 3-D
(`data.patch_size > 0`) is built as one volume per case and `read_patches` cuts each volume into
patches as it is read (`data/patches.py`), so only one volume is in memory at a time.
`load_arrays` is what `sources.load_federated` calls for built datasets. Reading refuses a
floating-point feature with a NaN or infinite value (`DataError`: rebuild the dataset).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from fedjax_med import streams
from fedjax_med.data import brats, nih_chestxray14, patches, synthetic_builders
from fedjax_med.data.errors import DataError
from fedjax_med.data.registry import BRATS_VERSIONS, REAL, SYNTHETIC, TASK_OF

_READ_BATCH = 256


def _instantiate(cls: type, config: tfds.core.BuilderConfig, **kw) -> tfds.core.DatasetBuilder:
    # TFDS refuses a custom config named like a predefined one; config names encode every
    # setting, so the predefined config of that name is the same config.
    if any(c.name == config.name for c in cls.BUILDER_CONFIGS):
        return cls(config=config.name, **kw)
    return cls(config=config, **kw)


def make_builder(
    name: str,
    *,
    data_dir: str | None,
    resolution: int,
    num_examples: int = 2500,
    seed: int = 0,
    slices_per_case: int = 16,
    brain_slices_only: bool = True,
    empty_slice_stride: int = 1,
    volumes: bool = False,
) -> tfds.core.DatasetBuilder:
    """The builder of dataset `name` (a `data.name`) with its config for these settings
    (`volumes`: BraTS, real or synthetic, as one 3-D volume per case)."""
    kw: dict[str, Any] = {'data_dir': data_dir or None, 'file_format': 'array_record'}
    if name == 'nih_chestxray14':
        cfg = nih_chestxray14.NihChestXray14Config(resolution=resolution)
        return _instantiate(nih_chestxray14.NihChestXray14, cfg, **kw)
    if volumes and name not in (*BRATS_VERSIONS, 'synthetic_brats'):
        raise ValueError(
            f'{name} has no 3-D volumes; only BraTS data ({BRATS_VERSIONS}, '
            "'synthetic_brats') can be built with volumes=True."
        )
    if name in BRATS_VERSIONS:
        cfg = brats.BratsConfig(
            version=name,
            resolution=resolution,
            brain_slices_only=brain_slices_only,
            empty_slice_stride=empty_slice_stride,
            volumes=volumes,
        )
        return _instantiate(brats.Brats, cfg, **kw)
    if name in SYNTHETIC:
        cfg = synthetic_builders.SyntheticConfig(
            resolution=resolution,
            num_examples=num_examples,
            seed=seed,
            slices_per_case=slices_per_case,
            volumes=volumes,
        )
        cls = (
            synthetic_builders.SyntheticCxr
            if name == 'synthetic_cxr'
            else synthetic_builders.SyntheticBrats
        )
        return _instantiate(cls, cfg, **kw)
    raise ValueError(f'Unknown dataset {name!r}; use one of {REAL + SYNTHETIC}.')


def is_built(builder: tfds.core.DatasetBuilder) -> bool:
    return (builder.data_path / 'dataset_info.json').exists()


def ensure_built(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
    """Builds `builder` unless it already is; real datasets need `manual_dir`."""
    if is_built(builder):
        return
    needs_manual = bool(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None))
    if needs_manual and not manual_dir:
        raise FileNotFoundError(
            f'Dataset {builder.name}/{builder.builder_config.name} is not built in '
            f'{builder.data_dir} and data.manual_dir is empty. Put the raw files in a folder and '
            f'set data.manual_dir (or run python -m fedjax_med.data.build). Instructions:\n'
            + builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    if needs_manual and (not os.path.isdir(manual_dir) or not os.listdir(manual_dir)):
        raise FileNotFoundError(
            f'data.manual_dir={manual_dir!r} is missing or empty. '
            'Instructions:\n' + builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    )


def _to_python(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _is_finite(example: dict) -> bool:
    return all(
        np.isfinite(v).all()
        for v in example.values()
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating)
    )


def _example_name(example: dict, index: int) -> str:
    for key in ('case_id', 'image_index'):
        if key in example:
            name = _to_python(example[key])
            return f'{name} slice {example["slice_index"]}' if 'slice_index' in example else name
    return f'example {index}'


def _non_finite_error(
    builder: tfds.core.DatasetBuilder, split: str, bad: list[str], total: int | None = None
) -> DataError:
    """`total`: the examples checked (None: the first bad one stopped the reading)."""
    bad = sorted(bad)
    shown = ', '.join(bad[:5]) + (' ...' if len(bad) > 5 else '')
    what = f'{len(bad)} of {total} examples hold' if total is not None else f'{shown} holds'
    detail = f' ({shown})' if total is not None else ''
    return DataError(
        f'{builder.data_path} ({split}): {what} NaN or infinite values{detail}; the '
        'dataset was built before the builders checked every value. Delete '
        f'{builder.data_path} and build it again.'
    )


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
    """All examples of one split as stacked numpy arrays (text features as str arrays).

    Raises DataError if a floating-point feature holds a NaN or infinite value (a dataset built
    before the builders validated every volume): no non-finite value reaches a split."""
    source = builder.as_data_source(split=split)
    n = len(source)
    columns: dict[str, list] = {}
    bad = []
    for start in range(0, n, _READ_BATCH):
        batch = source.__getitems__(list(range(start, min(start + _READ_BATCH, n))))
        for i, example in enumerate(batch, start=start):
            if not _is_finite(example):
                bad.append(_example_name(example, i))
            for k, v in example.items():
                columns.setdefault(k, []).append(_to_python(v))
    if bad:
        raise _non_finite_error(builder, split, bad, n)
    return {
        k: np.stack(v) if isinstance(v[0], np.ndarray) else np.asarray(v)
        for k, v in columns.items()
    }


def read_patches(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    patch_size: int,
    patches_per_case: int,
    tumour_fraction: float,
    seed: int,
    max_cases: int = 0,
) -> dict[str, np.ndarray]:
    """Patches of every case of a volume split (`make_builder(..., volumes=True)`), stacked.

    Volumes are read and cut one at a time (`patches.patches_from_cases`, seeded per case by
    (seed, patient_id)); the stored 'seg' volume is dropped. `max_cases` > 0 reads only a seeded
    subset of that many cases.
    """
    source = builder.as_data_source(split=split)
    indices = np.arange(len(source))
    if 0 < max_cases < len(indices):
        rng = np.random.default_rng([seed, streams.DATA_CASE_SUBSET])
        indices = np.sort(rng.choice(indices, max_cases, replace=False))

    def cases():
        for i in indices:
            example = source[int(i)]
            if not _is_finite(example):
                raise _non_finite_error(builder, split, [_example_name(example, int(i))])
            yield {
                k: _to_python(v)
                for k, v in example.items()
                if k in ('image', 'label') or np.ndim(v) < 2
            }

    return patches.patches_from_cases(
        cases(),
        patch_size=patch_size,
        patches_per_case=patches_per_case,
        tumour_fraction=tumour_fraction,
        seed=seed,
    )


def to_model_arrays(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read arrays -> the FederatedDataset conventions: int64 ids and 1-D integer columns. Images
    and labels keep the dtypes they were stored in (uint8 PNG pixels, float16 MRI, uint8
    labels), which are the storage dtypes of `storage.py`: nothing is inflated to float32."""
    out = dict(raw)
    out['patient_id'] = raw['patient_id'].astype(np.int64)
    for k, v in out.items():
        if np.issubdtype(v.dtype, np.integer) and v.ndim == 1:
            out[k] = v.astype(np.int64)
    return out


def builder_for(cfg: ml_collections.ConfigDict, seed: int) -> tfds.core.DatasetBuilder:
    """The TFDS builder of the dataset `cfg` (a config's `data`) reads (built or not)."""
    name = cfg.name
    task = 'chestxray14' if TASK_OF.get(name) == 'chestxray14' else 'brats'
    patch_size = int(cfg.get('patch_size', 0)) if task == 'brats' else 0
    per_case = (
        int(cfg.get('patches_per_case', 8)) if patch_size else int(cfg.get('slices_per_case', 16))
    )
    if name == 'synthetic_brats':
        num_examples = -(-(int(cfg.num_train) + int(cfg.num_test)) // per_case)
    else:
        num_examples = int(cfg.num_train) + int(cfg.num_test)
    return make_builder(
        name,
        data_dir=cfg.data_dir,
        resolution=int(cfg.resolution),
        num_examples=num_examples,
        seed=seed,
        slices_per_case=int(cfg.get('slices_per_case', 16)),
        brain_slices_only=bool(cfg.get('brain_slices_only', True)),
        empty_slice_stride=int(cfg.get('empty_slice_stride', 1)),
        volumes=patch_size > 0,
    )


def load_arrays(cfg: ml_collections.ConfigDict, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a (built, or buildable) dataset for load_federated.

    Returns the examples of every split concatenated, with 'is_official_test' when the dataset
    carries an official test split (NIH with its split lists), and an info dict.
    """
    name = cfg.name
    task = 'chestxray14' if TASK_OF.get(name) == 'chestxray14' else 'brats'
    patch_size = int(cfg.get('patch_size', 0)) if task == 'brats' else 0
    per_case = (
        int(cfg.get('patches_per_case', 8)) if patch_size else int(cfg.get('slices_per_case', 16))
    )
    builder = builder_for(cfg, seed)
    ensure_built(builder, cfg.manual_dir)
    splits = sorted(builder.info.splits.keys())
    max_cases = int(cfg.get('max_cases', 0))
    if patch_size:
        read = lambda s: read_patches(
            builder,
            s,
            patch_size=patch_size,
            patches_per_case=per_case,
            tumour_fraction=float(cfg.get('tumour_patch_fraction', 0.5)),
            seed=seed,
            max_cases=max_cases,
        )
    else:
        read = lambda s: read_split(builder, s)
    parts = {s: to_model_arrays(read(s)) for s in splits}
    metadata = builder.info.metadata or {}
    official = bool(metadata.get('official_split', False))
    if official:
        for s, arrays in parts.items():
            arrays['is_official_test'] = np.full(len(arrays['label']), s == 'test')
    examples = {k: np.concatenate([parts[s][k] for s in splits]) for k in parts[splits[0]]}
    if task == 'brats' and max_cases > 0 and not patch_size:
        cases = np.unique(examples['patient_id'])
        keep = np.random.default_rng([seed, streams.DATA_CASE_SUBSET]).choice(
            cases, min(max_cases, len(cases)), replace=False
        )
        examples = {k: v[np.isin(examples['patient_id'], keep)] for k, v in examples.items()}
    info = {
        'provenance': f'TFDS {builder.name}/{builder.builder_config.name} '
        f'{builder.version} in {builder.data_dir}',
        'official_split': official,
    }
    return examples, info
