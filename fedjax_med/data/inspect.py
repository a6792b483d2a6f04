"""Looks at the federated data a config produces: per-hospital counts, label mix, sample images.

  python -m fedjax_med.data.inspect --config=configs/chestxray14.py:synthetic --workdir=/tmp/insp

Prints each hospital's train/test sizes, patients and label histogram, and writes into --workdir
  samples.png   a few training images per hospital (BraTS: FLAIR with WT/TC/ET contours; 3-D
                patches by their axial slice with the most tumour)
  label_mix.png hospital x label heat map (fraction of training examples -- BraTS: slices or 3-D
                patches -- with the label), the counts written in the cells
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')  # files only; no display on servers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedjax_med.data import mri, sources, storage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the PNGs go.')
_PER_HOSPITAL = flags.DEFINE_integer('samples', 6, 'Images shown per hospital.')
_ABBREV = {
    'Atelectasis': 'Atel',
    'Cardiomegaly': 'Card',
    'Effusion': 'Effu',
    'Infiltration': 'Infi',
    'Mass': 'Mass',
    'Nodule': 'Nodu',
    'Pneumonia': 'Pna',
    'Pneumothorax': 'Ptx',
    'Consolidation': 'Cons',
    'Edema': 'Edem',
    'Emphysema': 'Emph',
    'Fibrosis': 'Fibr',
    'Pleural_Thickening': 'PlTh',
    'Hernia': 'Hern',
}


def describe(ds: sources.FederatedDataset) -> str:
    """A plain-text table of the partition: sizes, patients and label counts per hospital."""
    info = ds.info
    names = info['label_names']
    short = [_ABBREV.get(n, n[:6]) for n in names]
    lines = [
        f'{info["name"]} ({ds.task}), partition={info["partition"]}, '
        f'feature_skew={info["feature_skew"]}, test_fraction={info["test_fraction"]:.2f}',
        f'{"hospital":<12}{"train":>7}{"test":>6}{"pat.":>6}  '
        + ' '.join(f'{s:>6}' for s in short),
    ]
    counts = np.asarray(info['client_train_label_counts'])
    for h, name in enumerate(ds.client_names):
        lines.append(
            f'{name:<12}{info["client_train_sizes"][h]:>7}'
            f'{info["client_test_sizes"][h]:>6}{info["client_num_patients"][h]:>6}  '
            + ' '.join(f'{c:>6}' for c in counts[h])
        )
    total = counts.sum(0)
    lines.append(
        f'{"total":<12}{sum(info["client_train_sizes"]):>7}'
        f'{len(ds.test["label"]):>6}{"":>6}  ' + ' '.join(f'{c:>6}' for c in total)
    )
    return '\n'.join(lines)


def plot_label_mix(ds: sources.FederatedDataset, path: str) -> None:
    info = ds.info
    counts = np.asarray(info['client_train_label_counts'], np.float64)
    frac = counts / np.maximum(np.asarray(info['client_train_sizes'])[:, None], 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * counts.shape[1], 1.0 + 0.5 * counts.shape[0]))
    im = ax.imshow(frac, cmap='viridis', aspect='auto')
    for (h, k), c in np.ndenumerate(counts):
        ax.text(
            k,
            h,
            f'{int(c)}',
            ha='center',
            va='center',
            fontsize=7,
            color='white' if frac[h, k] < frac.max() / 2 else 'black',
        )
    ax.set_xticks(range(counts.shape[1]), info['label_names'], rotation=60, ha='right')
    ax.set_yticks(range(counts.shape[0]), ds.client_names)
    ax.set_title('fraction of training examples with each label (cells: counts)')
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(ds: sources.FederatedDataset, path: str, per_hospital: int) -> None:
    k = len(ds.clients_train)
    fig, axes = plt.subplots(k, per_hospital, figsize=(1.6 * per_hospital, 1.7 * k), squeeze=False)
    names = ds.info['label_names']
    for h, data in enumerate(ds.clients_train):
        rng = np.random.default_rng(h)
        if ds.task == 'brats':
            # Prefer tumour slices: they show the most.
            with_tumour = np.flatnonzero(
                data['label'][..., 0].reshape(len(data['label']), -1).max(1) > 0
            )
            if len(with_tumour) < per_hospital:
                with_tumour = np.arange(len(data['label']))
            pool = with_tumour
        else:
            pool = np.arange(len(data['label']))
        picks = rng.choice(pool, min(per_hospital, len(pool)), replace=False)
        for j, ax in enumerate(axes[h]):
            ax.axis('off')
            if j >= len(picks):
                continue
            i = picks[j]
            shown = storage.decode({'image': data['image'][i], 'label': data['label'][i]})
            image, label = shown['image'], shown['label']
            if ds.task == 'brats':
                if image.ndim == 4:  # a 3-D patch: its axial slice with the most tumour
                    dz = mri.largest_tumour_slice(label)
                    image, label = image[dz], label[dz]
                    z = f'{data["patch_origin"][i, 0] + dz}' if 'patch_origin' in data else '?'
                else:
                    z = data['slice_index'][i] if 'slice_index' in data else '?'
                ax.imshow(image[..., 0], cmap='gray')
                for r, color in zip(range(3), ('yellow', 'red', 'cyan'), strict=True):
                    if label[..., r].any():
                        ax.contour(label[..., r], [0.5], colors=color, linewidths=0.8)
                ax.set_title(f'case {data["patient_id"][i]} z{z}', fontsize=6)
            else:
                ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1)
                found = [_ABBREV.get(names[c], names[c]) for c in np.flatnonzero(label)]
                ax.set_title(','.join(found) or 'none', fontsize=6)
            if j == 0:
                ax.text(
                    -0.1,
                    0.5,
                    ds.client_names[h],
                    transform=ax.transAxes,
                    rotation=90,
                    ha='right',
                    va='center',
                    fontsize=7,
                )
    if ds.task == 'brats':
        fig.suptitle('FLAIR; contours WT yellow, TC red, ET cyan', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    ds = sources.load_federated(config.data, int(config.get('seed', 0)))
    print(describe(ds))
    plot_label_mix(ds, os.path.join(workdir, 'label_mix.png'))
    plot_samples(ds, os.path.join(workdir, 'samples.png'), _PER_HOSPITAL.value)
    print(f'wrote {workdir}/label_mix.png and {workdir}/samples.png')


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main)
