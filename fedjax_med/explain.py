"""Do two models look at the same pixels? `python -m fedjax_med.explain --workdirs=A,B`.

Explains the chest X-ray findings of two finished runs (e.g. a federated and a centralised one)
on the same test images with two methods and measures how much their explanations agree:

- **SHAP** (Lundberg and Lee 2017, "A unified approach to interpreting model predictions"), with
  the `shap` package's model-agnostic image explainer: `shap.Explainer(f, shap.maskers.Image(...))`,
  which is the Partition explainer, Owen values over a hierarchical clustering of the pixels; a
  masked pixel takes the baseline value 0 (a black image, the baseline of integrated gradients
  too). `f` is the jitted JAX model on numpy batches. It needs the optional `explain` extra
  (`pip install 'fedjax_med[explain]'`: shap brings numba, pandas and scikit-learn);
- **integrated gradients** (`attribution.py`, Sundararajan et al. 2017).

Each image is explained for one finding: the one with the highest mean predicted probability of
the two models, so both explain the same output. A map's importance is |attribution| summed over
channels. Agreement of the two models' maps, per method and image: Spearman rank correlation over
the pixels (mid-ranks for ties, which SHAP's block-constant maps have many of) and the
intersection over union of their top `--top_fraction` pixels (`attribution.topk_overlap`; two
random maps give about f / (2 - f), 0.053 at 10%), reported as the mean over the images with
a percentile bootstrap 95% confidence interval (`bootstrap_ci`, 2000 resamples of the images);
also SHAP against IG within each model. Writes A/explain.json (or `--output`) and explain.png
(a few images, each model's SHAP and IG maps). Errors (a workdir that is not a finished run,
shap missing, runs on different images) are one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags; defined only when it runs as a command, so that importing the
    module (the tests) adds nothing to absl's global flags, which other commands share."""
    flags.DEFINE_list('workdirs', None, 'Two finished runs, A,B (A: e.g. federated).')
    flags.DEFINE_integer('images', 50, 'Test images explained (the first N of the split).')
    flags.DEFINE_integer('max_evals', 500, 'SHAP: model evaluations per image.')
    flags.DEFINE_integer('ig_steps', 32, 'Integrated gradients: trapezoid intervals.')
    flags.DEFINE_float('top_fraction', 0.1, 'Top-k overlap: fraction of pixels.')
    flags.DEFINE_string('output', None, 'explain.json path (default: A/explain.json).')


METHODS = ('shap', 'integrated_gradients')


class ExplainError(ValueError):
    """An input that cannot be explained: one line naming the flag, the value and the fix."""


def import_shap():
    """The shap package, or ExplainError saying how to install it."""
    try:
        import shap
    except ImportError as e:
        raise ExplainError(
            f"SHAP needs the shap package ({e}); install it with pip install 'fedjax_med[explain]'."
        ) from None
    return shap


def shap_maps(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    classes: np.ndarray,
    *,
    baseline: np.ndarray | None = None,
    max_evals: int = 500,
    batch_size: int = 64,
) -> np.ndarray:
    """Partition-explainer SHAP values [B, H, W, C] of output `classes[b]` for each image b.

    Args:
      predict: numpy images [n, H, W, C] -> outputs [n, num_outputs].
      images: [B, H, W, C]; classes: int [B].
      baseline: what a masked pixel becomes (default zeros, [H, W, C]).
    """
    shap = import_shap()
    shape = images.shape[1:]
    baseline = np.zeros(shape, np.float32) if baseline is None else baseline
    masker = shap.maskers.Image(np.asarray(baseline, np.float64), shape)
    out = np.empty(images.shape, np.float64)
    for b, (image, cls) in enumerate(zip(images, classes, strict=True)):
        f = lambda z, c=int(cls): np.asarray(predict(np.asarray(z, np.float32)))[:, c : c + 1]
        explainer = shap.Explainer(f, masker)
        values = explainer(image[None], max_evals=max_evals, batch_size=batch_size).values
        out[b] = np.asarray(values)[0, ..., 0]
    return out


def bootstrap_ci(values, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of `values` with the percentile bootstrap 95% interval (resampling the values)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {'mean': float(values.mean()), 'ci95': [float(low), float(high)], 'n': len(values)}


def agreement(maps_a: np.ndarray, maps_b: np.ndarray, *, top_fraction: float = 0.1) -> dict:
    """Per-image Spearman and top-k overlap of two stacks of importance maps [B, H, W], each
    summarised by `bootstrap_ci`, plus the per-image values."""
    from scipy import stats

    from fedjax_med import attribution

    # Mid-ranks for ties (scipy): a Partition-explainer map is constant on the blocks of its
    # pixel hierarchy, and both models' maps share the blocks, so breaking ties by position
    # (`attribution.spearman`) would correlate them within every block.
    rho = [
        float(stats.spearmanr(a.ravel(), b.ravel()).statistic)
        for a, b in zip(maps_a, maps_b, strict=True)
    ]
    iou = [
        float(attribution.topk_overlap(a, b, top_fraction))
        for a, b in zip(maps_a, maps_b, strict=True)
    ]
    return {
        'spearman': {**bootstrap_ci(rho), 'per_image': rho},
        'topk_overlap': {**bootstrap_ci(iou), 'per_image': iou, 'fraction': top_fraction},
    }


def _load(workdir: str):
    """(experiment, params) of a finished run; ExplainError (not AuditError) if it is none."""
    from fedjax_med import audit

    try:
        exp, params, _, _ = audit.load(workdir)
    except audit.AuditError as e:
        raise ExplainError(str(e).replace('--workdir=', '--workdirs: ', 1)) from None
    if exp.config.task != 'chestxray14':
        raise ExplainError(
            f'--workdirs: {workdir} is a {exp.config.task!r} run; explain compares chest X-ray '
            'classifiers (chestxray14 runs).'
        )
    if exp.config.mode == 'local':
        raise ExplainError(
            f'--workdirs: {workdir} is a local-mode run (one model per hospital); give a '
            'federated or centralised run.'
        )
    return exp, params


# Long on purpose: loading both runs, picking the findings, the two methods for both models and
# the agreement table are one pipeline, and explain.json records every choice it makes.
def run(
    workdirs: Sequence[str],
    *,
    images: int = 50,
    max_evals: int = 500,
    ig_steps: int = 32,
    top_fraction: float = 0.1,
    output: str | None = None,
) -> dict:
    """Explains `images` test images with both runs' models; writes explain.json and .png."""
    import jax

    from fedjax_med import attribution
    from fedjax_med.data import storage

    if len(workdirs) != 2:
        raise ExplainError(
            f'--workdirs={",".join(workdirs)}: give exactly two runs, e.g. '
            '--workdirs=runs/fed,runs/central.'
        )
    if images < 2:
        raise ExplainError(f'--images={images}: the bootstrap needs at least 2; e.g. 50.')
    import_shap()
    (exp_a, params_a), (exp_b, params_b) = (_load(w) for w in workdirs)
    test = storage.decode({k: np.asarray(exp_a.data.test[k][:images]) for k in ('image', 'label')})
    other = np.asarray(exp_b.data.test['image'][:images])
    if other.shape != test['image'].shape or not np.array_equal(
        storage.decode_images(other), test['image']
    ):
        raise ExplainError(
            f'--workdirs={",".join(workdirs)}: the two runs have different test images; '
            'compare runs of the same data config and seed.'
        )
    x = test['image']
    predictors = [
        jax.jit(lambda z, e=e, p=p: e.apply_fn(p, z))
        for e, p in ((exp_a, params_a), (exp_b, params_b))
    ]
    logits = [np.asarray(f(x)) for f in predictors]
    probs = sum(1 / (1 + np.exp(-lg)) for lg in logits) / 2
    classes = probs.argmax(axis=1)
    maps = {}
    for name, f, (exp, params) in zip(
        ('a', 'b'), predictors, ((exp_a, params_a), (exp_b, params_b)), strict=True
    ):
        shap_values = shap_maps(lambda z, f=f: np.asarray(f(z)), x, classes, max_evals=max_evals)
        ig = attribution.model_integrated_gradients(
            lambda z, e=exp, p=params: e.apply_fn(p, z), x, classes, steps=ig_steps
        )
        maps[name] = {
            'shap': np.abs(shap_values).sum(-1),
            'integrated_gradients': np.asarray(attribution.saliency(ig)),
        }
    from fedjax_med.data.nih_metadata import CXR_LABELS

    result = {
        'workdirs': [os.path.abspath(w) for w in workdirs],
        'images': images,
        'split': 'the global test split of run A (the first images)',
        'findings': [CXR_LABELS[c] for c in classes],
        'shap': {
            'explainer': 'Partition (shap.Explainer, Image masker, baseline 0)',
            'max_evals': max_evals,
        },  # fmt: skip
        'integrated_gradients': {'steps': ig_steps, 'baseline': 0},
        'a_vs_b': {
            m: agreement(maps['a'][m], maps['b'][m], top_fraction=top_fraction) for m in METHODS
        },
        'shap_vs_ig': {
            n: agreement(
                maps[n]['shap'], maps[n]['integrated_gradients'], top_fraction=top_fraction
            )
            for n in ('a', 'b')
        },
    }
    output = output or os.path.join(workdirs[0], 'explain.json')
    with open(output, 'w') as f:
        json.dump(result, f, indent=2)
    result['figure'] = _figure(os.path.splitext(output)[0] + '.png', x, maps, result)
    return result


def _figure(path: str, images: np.ndarray, maps: dict, result: dict, count: int = 4) -> str:
    """explain.png: a few images and each model's SHAP and IG maps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = min(count, len(images))
    rows = [('image', None, None)] + [
        (f'{label} {run.upper()}', run, m)
        for run in ('a', 'b')
        for m, label in (('shap', 'SHAP'), ('integrated_gradients', 'IG'))
    ]
    fig = Figure(figsize=(1.8 * count + 0.6, 1.8 * len(rows)))
    FigureCanvasAgg(fig)
    for r, (label, run, method) in enumerate(rows):
        for b in range(count):
            ax = fig.add_subplot(len(rows), count, r * count + b + 1)
            if run is None:
                ax.imshow(images[b, ..., 0], cmap='gray', vmin=0, vmax=1)
                ax.set_title(result['findings'][b], fontsize=7)
            else:
                ax.imshow(maps[run][method][b], cmap='magma')
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def summary_lines(result: dict) -> list[str]:
    """The printed summary of `run`'s result."""
    a, b = result['workdirs']
    lines = [f'explanations of {a} (A) vs {b} (B) on {result["images"]} test images']
    for m in METHODS:
        for metric, label in (('spearman', 'Spearman'), ('topk_overlap', 'top-10% IoU')):
            s = result['a_vs_b'][m][metric]
            lines.append(
                f'  {m} A vs B {label}: {s["mean"]:.3f} (95% CI {s["ci95"][0]:.3f} to '
                f'{s["ci95"][1]:.3f})'
            )
    for n in ('a', 'b'):
        s = result['shap_vs_ig'][n]['spearman']
        lines.append(f'  SHAP vs IG within {n.upper()} Spearman: {s["mean"]:.3f}')
    lines.append(f'  figure {result["figure"]}')
    return lines


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f'fedjax_med.explain: unexpected arguments {argv[1:]}; all inputs are --flags.')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    from fedjax_med.validate import ConfigError

    try:
        if not FLAGS.workdirs:
            raise ExplainError('--workdirs is required: two finished runs, e.g. --workdirs=A,B.')
        result = run(
            FLAGS.workdirs,
            images=FLAGS.images,
            max_evals=FLAGS.max_evals,
            ig_steps=FLAGS.ig_steps,
            top_fraction=FLAGS.top_fraction,
            output=FLAGS.output,
        )
    except ExplainError as e:
        print(f'fedjax_med.explain: error: {e}', file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        for problem in e.problems:
            print(f'fedjax_med.explain: error: --workdirs: {problem}', file=sys.stderr)
        sys.exit(2)
    print('\n'.join(summary_lines(result)))


if __name__ == '__main__':
    define_flags()
    app.run(main)
