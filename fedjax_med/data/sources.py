"""`load_federated`: a config in, K hospitals' train/test arrays out.

Pipeline: examples (synthetic twin generated in memory, or a built TFDS dataset read through its
array_record data source) -> patient-wise partition into K hospitals (`partition.py`) ->
patient-wise train/test split inside each hospital -> each hospital's acquisition shift (when
`feature_skew`) -> compact storage dtypes -> `FederatedDataset`.

`data_config` fields (configs/base.py holds the defaults):
  name: 'synthetic_cxr' | 'nih_chestxray14' | 'synthetic_brats' | 'brats2020' | 'brats2021' |
    'msd_brain'.
  data_dir: TFDS data dir of built datasets ('' = TFDS default, ~/tensorflow_datasets).
  manual_dir: raw files of a real dataset; if given and the dataset is not built yet, it is built
    into data_dir first.
  resolution: image side in pixels (a real dataset is built once per resolution: one TFDS
    builder config each).
  num_train, num_test: synthetic only, examples over all hospitals (for BraTS: slices, or patches
    in 3-D; cases are ceil(total / slices_per_case), or ceil(total / patches_per_case)). Each
    hospital holds out about num_test / (num_train + num_test) of its patients as its test split,
    so the global test set has about num_test examples.
  num_clients: K hospitals.
  partition: 'iid' | 'dirichlet' | 'pathological' | 'quantity' | 'natural' (see partition.py).
  dirichlet_alpha: Dirichlet concentration of the label skew (smaller = more skewed).
  findings_per_client: pathological, classes held per hospital.
  quantity_sigma: quantity, log-normal sigma of hospital sizes.
  natural_column: natural, the metadata column ('view', 'sex', 'age' for CXR; 'grade' for BraTS).
  feature_skew: apply each hospital's acquisition shift (partition.apply_acquisition_shift).
  test_fraction: real datasets without an official test list: fraction of each hospital's
    examples (whole patients) held out as its test split.
Optional fields (configs/base.py defines them all; read here with the same defaults, so a bare
data ConfigDict need not):
  synthetic_signal (2.5): synthetic CXR, strength of the findings' signatures (1 = subtle).
  slices_per_case (16): synthetic BraTS, axial slices per case.
  patch_size (0): BraTS, 0 for 2-D axial slices; P > 0 for 3-D patches of P^3 voxels cut from
    whole volumes (synthetic: cubes of resolution^3 voxels; real: the builder's 3-D mode, see
    brats.py), with foreground oversampling (see patches.py).
  patches_per_case (8), tumour_patch_fraction (0.5): BraTS 3-D, patches cut from each case and
    the fraction of them centred on a tumour voxel.
  synthetic_via_tfds (False): build the synthetic twin as a TFDS dataset in data_dir and read it
    back through its array_record data source (same path as the real datasets) instead of
    generating it in memory.
  brain_slices_only (True), empty_slice_stride (1): real BraTS builder config (see brats.py).
  max_cases (0 = all): BraTS read through TFDS (real, or synthetic_via_tfds), a seeded subset of
    that many cases. 3-D reads only those cases' volumes; 2-D reads every slice, then keeps those
    cases' slices (it bounds the arrays trained on, not the memory used while reading).

Partition classes: CXR uses the primary label (rarest finding of the patient, 'No Finding' as its
own class). BraTS uses the case's tumour-volume tertile (small / medium / large whole tumour), so
'dirichlet' gives hospitals different tumour-size mixes.

The NIH official split: when the dataset was built with train_val_list.txt / test_list.txt, a
hospital's test split is the official test images of its patients and `test` is the official test
list; otherwise every hospital splits its own patients by `test_fraction`.

Every split dict also carries 'hospital' (int64, the hospital index) besides the dataset's metadata.

Array dtypes (`storage.py`): the splits stay compact, on the host and on the device, and are
decoded to float32 only batch by batch inside the jitted round and evaluation.
  'image'  CXR: uint8 [n, H, W, 1], pixel v standing for v / 255 in [0, 1] (`storage.CXR_SCALE`);
           BraTS: float16 [n, H, W, 4] or [n, P, P, P, 4], z-scored in the head, 0 outside.
  'label'  uint8: CXR multi-hot [n, 14]; BraTS WT/TC/ET masks [n, H, W, 3] or [n, P, P, P, 3].
The synthetic twins are generated in float32 and real datasets are read in their stored dtypes;
each hospital split is brought to the storage dtypes after its acquisition shift (a synthetic CXR
image is rounded once, to within 0.5 / 255 of its float value).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from fedjax_med import streams
from fedjax_med.data import nih_metadata, partition, storage, synthetic
from fedjax_med.data.registry import TASK_OF

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class FederatedDataset:
    """K hospitals' arrays in their storage dtypes (see the module docstring): every dict has
    'image' [n, H, W, C] (BraTS 3-D patches: [n, P, P, P, 4]), 'label' uint8 (CXR: [n, 14]
    multi-hot; BraTS: [n, H, W, 3] or [n, P, P, P, 3] WT/TC/ET), 'patient_id' int64 [n] and
    metadata. `storage.decode` gives the float32 model inputs."""

    task: str
    clients_train: list[Arrays]
    clients_test: list[Arrays]
    test: Arrays
    client_names: list[str]
    info: dict[str, Any]
    # Patients held out of every hospital (`data.public_fraction`): a stand-in for a public
    # dataset such as CheXpert or MIMIC-CXR, for pretraining; None when there is none.
    public: Arrays | None = None


def _take(arrays: Arrays, idx: np.ndarray) -> Arrays:
    return {k: v[idx] for k, v in arrays.items()}


def _concat(parts: list[Arrays]) -> Arrays:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------
# Examples of each dataset
# ---------------------------------------------------------------------------------------------


def _synthetic_cxr(cfg: ml_collections.ConfigDict, seed: int) -> tuple[Arrays, dict]:
    total = int(cfg.num_train) + int(cfg.num_test)
    rows = synthetic.sample_cxr_metadata(
        total, seed, max_images_per_patient=int(cfg.get('max_images_per_patient', 4))
    )
    examples = synthetic.synthetic_cxr(
        total,
        int(cfg.resolution),
        seed,
        rows,
        signal=float(cfg.get('synthetic_signal', synthetic.DEFAULT_CXR_SIGNAL)),
    )
    return examples, {
        'provenance': 'synthetic twin; labels, patient ids, views, ages and sexes '
        'drawn from the real NIH ChestX-ray14 metadata'
    }


def _synthetic_brats(cfg: ml_collections.ConfigDict, seed: int) -> tuple[Arrays, dict]:
    total = int(cfg.num_train) + int(cfg.num_test)
    patch_size = int(cfg.get('patch_size', 0))
    if patch_size:
        per_case = int(cfg.get('patches_per_case', 8))
        examples = synthetic.synthetic_brats_patches(
            math.ceil(total / per_case),
            int(cfg.resolution),
            patch_size,
            per_case,
            float(cfg.get('tumour_patch_fraction', 0.5)),
            seed,
        )
        return examples, {
            'provenance': f'synthetic twin of BraTS (labels 0/1/2/4 -> WT/TC/ET), '
            f'{patch_size}^3 patches of {int(cfg.resolution)}^3 '
            'volumes'
        }
    slices = int(cfg.get('slices_per_case', 16))
    examples = synthetic.synthetic_brats(
        math.ceil(total / slices), int(cfg.resolution), slices, seed
    )
    return examples, {'provenance': 'synthetic twin of BraTS (labels 0/1/2/4 -> WT/TC/ET)'}


def _built(cfg: ml_collections.ConfigDict, seed: int) -> tuple[Arrays, dict]:
    # Imported here: TFDS is slow to import and the synthetic fast path does not need it.
    from fedjax_med.data import tfds_io

    return tfds_io.load_arrays(cfg, seed)


def _unit_classes(task: str, examples: Arrays) -> tuple[np.ndarray | None, int | None]:
    """BraTS: tertile of each case's whole-tumour volume (CXR derives classes from labels)."""
    if task != 'brats':
        return None, None
    _, example_unit = partition.group_units(examples['patient_id'])
    wt = examples['label'][..., 0].reshape(len(example_unit), -1).sum(1)
    volume = np.bincount(example_unit, weights=wt)
    cuts = np.quantile(volume, [1 / 3, 2 / 3])
    return np.searchsorted(cuts, volume, side='right').astype(np.int64), 3


# ---------------------------------------------------------------------------------------------
# The federated dataset
# ---------------------------------------------------------------------------------------------

# The last dataset built, kept when `keep_last_dataset(True)` (launch/experiments.py: the runs of a
# grid that share a seed share their data, and the NIH-sized twin takes a minute to render).
_LAST: dict[str, Any] = {'enabled': False, 'key': None, 'data': None}
# Fields that choose what is trained on, not what the dataset is.
_NOT_DATA = ('train_on', 'data_dir', 'manual_dir')


def keep_last_dataset(enabled: bool = True) -> None:
    """Keep (or stop keeping) the last `load_federated` result in memory for an identical call."""
    _LAST.update(enabled=enabled, key=None, data=None)


def load_federated(data_config: ml_collections.ConfigDict, seed: int) -> FederatedDataset:
    """Builds the K hospitals' train/test arrays described by `data_config` (see module doc)."""
    if not _LAST['enabled']:
        return _load_federated(data_config, seed)
    fields = {k: v for k, v in data_config.to_dict().items() if k not in _NOT_DATA}
    key = repr((sorted(fields.items()), seed, data_config.get('data_dir', '')))
    if _LAST['key'] != key:
        _LAST.update(key=None, data=None)  # free the old one before building the next
        _LAST.update(key=key, data=_load_federated(data_config, seed))
    return _LAST['data']


# Long on purpose: the steps of building a federation (read or generate, hold out the public
# set, partition, split, shift, encode) run once, in this order, on shared arrays.
def _load_federated(data_config: ml_collections.ConfigDict, seed: int) -> FederatedDataset:
    cfg = data_config
    name = cfg.name
    if name not in TASK_OF:
        raise ValueError(f'Unknown data.name {name!r}; use one of {sorted(TASK_OF)}.')
    task = TASK_OF[name]
    via_tfds = bool(cfg.get('synthetic_via_tfds', False))
    if name == 'synthetic_cxr' and not via_tfds:
        examples, info = _synthetic_cxr(cfg, seed)
    elif name == 'synthetic_brats' and not via_tfds:
        examples, info = _synthetic_brats(cfg, seed)
    else:
        examples, info = _built(cfg, seed)
    is_official_test = examples.pop('is_official_test', None)
    k = int(cfg.num_clients)
    public = None
    public_fraction = float(cfg.get('public_fraction', 0.0))
    if public_fraction > 0:
        public_idx, kept = hold_out_patients(examples['patient_id'], public_fraction, seed)
        public = _take(examples, public_idx)
        examples = _take(examples, kept)
        if is_official_test is not None:
            is_official_test = is_official_test[kept]
        if cfg.feature_skew:  # another site's scanner: index k is no hospital of the federation
            public['image'] = partition.apply_acquisition_shift(
                public['image'],
                k,
                task,
                seed,
                origins=public.get('patch_origin'),
                volume_shapes=public.get('volume_shape'),
            )
        public = storage.encode(task, public)
        public['hospital'] = np.full(len(public['patient_id']), -1, np.int64)

    strategy = cfg.partition
    column = None
    if strategy == 'natural':
        col = cfg.natural_column
        if col not in examples or examples[col].ndim != 1:
            meta = sorted(c for c, v in examples.items() if v.ndim == 1)
            raise ValueError(
                f'data.natural_column={col!r} is not a metadata column of {name}; '
                f'use one of {meta}.'
            )
        column = examples[col]
    unit_classes, num_classes = _unit_classes(task, examples)
    parts = partition.partition_examples(
        strategy,
        unit_ids=examples['patient_id'],
        num_clients=k,
        seed=seed,
        labels=examples['label'] if task == 'chestxray14' else None,
        unit_classes=unit_classes,
        num_classes=num_classes,
        dirichlet_alpha=float(cfg.dirichlet_alpha),
        classes_per_client=int(cfg.findings_per_client),
        quantity_sigma=float(cfg.quantity_sigma),
        column=column,
    )

    if name.startswith('synthetic'):
        test_fraction = int(cfg.num_test) / (int(cfg.num_train) + int(cfg.num_test))
    else:
        test_fraction = float(cfg.test_fraction)
    rng = np.random.default_rng([seed, streams.DATA_TEST_SPLIT])
    train_idx, test_idx = [], []
    for idx in parts:
        if is_official_test is not None:
            train_idx.append(idx[~is_official_test[idx]])
            test_idx.append(idx[is_official_test[idx]])
        else:
            tr, te = partition.split_train_test(idx, examples['patient_id'], test_fraction, rng)
            train_idx.append(tr)
            test_idx.append(te)

    clients_train, clients_test = [], []
    for h, (tr, te) in enumerate(zip(train_idx, test_idx, strict=True)):
        splits = []
        for split in (_take(examples, tr), _take(examples, te)):
            if cfg.feature_skew:
                # 3-D patches carry their place in the volume, for a bias field over the head.
                split['image'] = partition.apply_acquisition_shift(
                    split['image'],
                    h,
                    task,
                    seed,
                    origins=split.get('patch_origin'),
                    volume_shapes=split.get('volume_shape'),
                )
            # Rounded only now, after the shift in float: the hospital's scanner writes the
            # 8-bit images (a real dataset read as uint8 is decoded for the shift).
            split = storage.encode(task, split)
            split['hospital'] = np.full(len(split['patient_id']), h, np.int64)
            splits.append(split)
        clients_train.append(splits[0])
        clients_test.append(splits[1])
    del examples

    client_names = [f'hospital_{h}' for h in range(k)]
    info.update(_summary(task, cfg, clients_train, clients_test, test_fraction, seed))
    if public is not None:
        info['public_size'] = len(public['patient_id'])
        info['public_num_patients'] = len(np.unique(public['patient_id']))
    return FederatedDataset(
        task=task,
        clients_train=clients_train,
        clients_test=clients_test,
        test=_concat(clients_test),
        client_names=client_names,
        info=info,
        public=public,
    )


def hold_out_patients(
    patient_ids: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of a seeded `fraction` of the patients, indices of the rest): whole patients, so
    no patient of the held-out (public) part appears in any hospital."""
    uniq, example_unit = partition.group_units(np.asarray(patient_ids))
    rng = np.random.default_rng([seed, streams.DATA_PUBLIC])
    chosen = np.zeros(len(uniq), bool)
    chosen[rng.permutation(len(uniq))[: max(1, round(fraction * len(uniq)))]] = True
    held = chosen[example_unit]
    return np.flatnonzero(held), np.flatnonzero(~held)


def _summary(
    task: str,
    cfg: ml_collections.ConfigDict,
    train: list[Arrays],
    test: list[Arrays],
    test_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Label names, sizes and per-hospital label counts, for logs and the inspect tool."""
    if task == 'chestxray14':
        label_names = list(nih_metadata.CXR_LABELS)
        count = lambda d: d['label'].sum(0).astype(np.int64)
    else:
        from fedjax_med.data import mri

        label_names = list(mri.REGIONS)
        # Slices (3-D: patches) containing each region: a compact, comparable per-hospital
        # histogram. max over the pixel axes (an empty split has no pixels to reshape over)
        count = lambda d: (
            d['label']
            .max(axis=tuple(range(1, d['label'].ndim - 1)), initial=0)
            .sum(0)
            .astype(np.int64)
        )
    info = {
        'task': task,
        'name': cfg.name,
        'label_names': label_names,
        'resolution': int(cfg.resolution),
        'patch_size': int(cfg.get('patch_size', 0)),
        'channels': int(train[0]['image'].shape[-1]),
        'partition': cfg.partition,
        'num_clients': len(train),
        'test_fraction': test_fraction,
        'feature_skew': bool(cfg.feature_skew),
        'client_train_sizes': [len(d['label']) for d in train],
        'client_test_sizes': [len(d['label']) for d in test],
        'client_num_patients': [len(np.unique(d['patient_id'])) for d in train],
        'client_train_label_counts': np.stack([count(d) for d in train]),
        'client_test_label_counts': np.stack([count(d) for d in test]),
    }
    if cfg.feature_skew:
        info['acquisition'] = [
            {
                k: np.round(v, 3).tolist()
                for k, v in partition.acquisition_params(h, task, seed).items()
            }
            for h in range(len(train))
        ]
    return info
