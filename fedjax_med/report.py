"""Figures and an HTML page from finished (or running) runs: `python -m fedjax_med.report DIR...`.

Each DIR is a run's workdir (it holds metrics.jsonl) or a folder with runs below it (e.g. the
workdir of launch/experiments.py). The PNGs and `index.html` go to `--out` (default: the first
DIR). One set of figures per task (their metrics differ):

  <task>_metric_vs_round.png     global test metric per round, one line per algorithm/DP setting
                                 (mean over seeds, band = +-1 std), one panel per data partition
  <task>_epsilon_vs_round.png    DP runs: epsilon spent so far (max over hospitals) per round
  <task>_privacy_utility.png     final metric vs achieved epsilon of the DP runs; runs without
                                 DP as a dashed horizontal line per algorithm
  <task>_comm_utility.png        metric vs cumulative bytes per hospital (up + down); the
                                 centralised result as a dashed line
  <task>_hospital_fairness.png   last evaluated metric on each hospital's own test split
  brats_overlays.png             FLAIR with WT/TC/ET contours: ground truth, then each model
  chestxray14_attribution.png    integrated-gradients maps of two models side by side (a
                                 federated and a centralised one trained alike when both exist,
                                 else e.g. one without and one with DP; the caption says which),
                                 with their agreement (attribution.py)

A run audited by `python -m fedjax_med.audit` (its audit.json) gets a section of its own: the
membership-inference table, the canary audit's epsilon lower bound next to the accountant's, and
its audit_roc.png.

Model figures restore the parameters from the run's checkpoint and re-create the test data from
the run's config.json (`load_federated`), so they need the data the run used (synthetic data is
regenerated from the seed). Figures are drawn with matplotlib's Agg canvas on `Figure` objects
(no pyplot state), so importing this module never changes a notebook's backend.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import html
import json
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedjax_med.data import storage

METRIC_NAME = {'mean_auroc': 'mean AUROC', 'mean_dice': 'mean Dice'}
# The paper's headline bounds, drawn as reference lines.
PAPER_EPSILON_BOUND = 4.5
PAPER_MB_PER_HOSPITAL = 250.0
REGION_COLOURS = {'WT': '#ffd700', 'TC': '#ff4040', 'ET': '#00e5ff'}
# (line width, dash pattern). The regions are nested (ET in TC in WT) and their contours often
# coincide (the outer border of an enhancing rim is the core's border): WT is drawn widest at the
# bottom, TC narrower on top of it (WT shows at both sides of a shared border), and ET dashed on
# top of both (TC shows in its gaps); the styles also tell the regions apart without colour.
REGION_STYLES = {'WT': (2.6, 'solid'), 'TC': (1.3, 'solid'), 'ET': (1.3, (0, (2.5, 2.5)))}
REGION_NAMES = {'WT': 'whole tumour', 'TC': 'tumour core', 'ET': 'enhancing tumour'}


def main_metric(task: str) -> str:
    """The task's main metric, a key under eval/ (`tasks.Task.main_metric`)."""
    from fedjax_med.tasks import TASKS  # imports jax: only when it is needed, not with this module

    return TASKS[task].main_metric


# -------------------------------------------------------------------------------------------------
# Runs on disk
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One run's files: config.json, metrics.jsonl, summary.json (if finished), run_info.json."""

    path: str
    config: dict
    rows: list[dict]
    summary: dict | None
    info: dict

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def task(self) -> str:
        return self.config['task']

    @property
    def main_metric(self) -> str:
        return main_metric(self.task)

    @property
    def seed(self) -> int:
        return int(self.config['seed'])

    @property
    def algorithm(self) -> str:
        mode = self.config['mode']
        if mode != 'federated':
            return mode
        if self.config['local']['prox_mu'] > 0:
            return 'fedprox'
        return self.config['server']['optimizer']

    @property
    def dp_target(self) -> float:
        """Target epsilon of sample-level DP (0 without DP or with a fixed noise multiplier)."""
        dp = self.config['dp']
        return float(dp['target_epsilon']) if dp['mode'] != 'none' else 0.0

    @property
    def dp_label(self) -> str:
        dp = self.config['dp']
        if dp['mode'] == 'none':
            return 'no DP'
        kind = 'DP' if dp['mode'] == 'sample' else 'client-DP'
        if dp['target_epsilon'] > 0:
            return f'{kind} ε≤{dp["target_epsilon"]:g}'
        return f'{kind} σ={dp["noise_multiplier"]:g}'

    @property
    def partition(self) -> str:
        return self.config['data']['partition']

    @property
    def alpha(self) -> float | None:
        return (
            float(self.config['data']['dirichlet_alpha']) if self.partition == 'dirichlet' else None
        )

    @property
    def partition_label(self) -> str:
        if self.partition == 'dirichlet':
            return f'Dirichlet α={self.alpha:g}'
        return self.partition.upper() if self.partition == 'iid' else self.partition

    @property
    def label(self) -> str:
        """Algorithm and DP setting: runs that differ only in seed share a label."""
        return f'{self.algorithm} · {self.dp_label}'

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, values) of a metric over the rows that hold it (evaluation rounds)."""
        pairs = [(r['round'], r[key]) for r in self.rows if r.get(key) is not None]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        rounds, values = zip(*pairs, strict=True)
        return np.asarray(rounds, float), np.asarray(values, float)

    def final(self, key: str) -> float:
        _, values = self.series(key)
        return float(values[-1]) if len(values) else math.nan

    def best(self, key: str) -> float:
        _, values = self.series(key)
        return float(np.nanmax(values)) if len(values) else math.nan

    @property
    def final_metric(self) -> float:
        return self.final(f'eval/{self.main_metric}')

    @property
    def best_metric(self) -> float:
        return self.best(f'eval/{self.main_metric}')

    @property
    def epsilon(self) -> float:
        """Achieved epsilon (max over hospitals) at the end; nan without DP."""
        return self.final('privacy/epsilon')

    def bytes_per_hospital(self) -> np.ndarray:
        """Cumulative bytes per hospital (up + down) after each row."""
        return np.asarray(
            [
                r.get('comm/cum_bytes_up_per_client', 0)
                + r.get('comm/cum_bytes_down_per_client', 0)
                for r in self.rows
            ],
            float,
        )

    @property
    def total_bytes_per_hospital(self) -> float:
        b = self.bytes_per_hospital()
        return float(b[-1]) if len(b) else 0.0

    @property
    def wall_time_s(self) -> float:
        """Training time: the sum of the rounds' times (over every resumption of the run)."""
        return float(sum(r.get('time/round_s') or 0.0 for r in self.rows))

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def hospital_metrics(self) -> dict[str, float]:
        """hospital name -> main metric on its own test split, from the last evaluated row."""
        suffix = '/' + self.main_metric
        for row in reversed(self.rows):
            found = {
                k[len('hospital/') : -len(suffix)]: v
                for k, v in row.items()
                if k.startswith('hospital/') and k.endswith(suffix)
            }
            if found:
                return {k: math.nan if v is None else float(v) for k, v in found.items()}
        return {}


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(path: str) -> Run:
    """Reads a run directory (it must hold config.json and metrics.jsonl)."""
    from fedjax_med.checkpoint import with_added_fields

    config = _read_json(os.path.join(path, 'config.json'))
    if config is None:
        raise FileNotFoundError(f'{path} has no config.json; is it a fedjax_med run directory?')
    config = with_added_fields(config)  # runs older than a field ran with its old behaviour
    rows = []
    metrics_path = os.path.join(path, 'metrics.jsonl')
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return Run(
        path=path,
        config=config,
        rows=rows,
        summary=_read_json(os.path.join(path, 'summary.json')),
        info=_read_json(os.path.join(path, 'run_info.json')) or {},
    )


def find_runs(dirs: Sequence[str]) -> list[Run]:
    """Every run directory (one with config.json and metrics.jsonl) in or below `dirs`."""
    paths = []
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            if 'config.json' in files and 'metrics.jsonl' in files:
                paths.append(root)
                subdirs[:] = []  # a run's checkpoints/ holds no runs
            else:
                subdirs.sort()
    if not paths:
        raise FileNotFoundError(f'No runs (config.json + metrics.jsonl) in or below {list(dirs)}.')
    return [load_run(p) for p in sorted(dict.fromkeys(paths))]


# -------------------------------------------------------------------------------------------------
# Grouping and small plotting helpers
# -------------------------------------------------------------------------------------------------


def _group(runs: Sequence[Run], key: Callable[[Run], object]) -> dict:
    groups = collections.defaultdict(list)
    for run in runs:
        groups[key(run)].append(run)
    return dict(groups)


def _mean_series(xs_ys: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and std over runs at each x that any run reports (seeds share their rounds)."""
    table = collections.defaultdict(list)
    for xs, ys in xs_ys:
        for x, y in zip(xs, ys, strict=True):
            table[float(x)].append(y)
    xs = np.array(sorted(table))
    mean = np.array([np.nanmean(table[x]) for x in xs])
    std = np.array([np.nanstd(table[x]) for x in xs])
    return xs, mean, std


def _facets(runs: Sequence[Run]) -> list[str]:
    return sorted({r.partition_label for r in runs})


def _new_figure(num_panels: int, height: float = 3.6):
    fig = Figure(figsize=(4.6 * num_panels + 1.8, height), layout='constrained')
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, num_panels, sharey=True, squeeze=False)[0])
    return fig, axes


def _colours(labels: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps['tab10' if len(labels) <= 10 else 'tab20']
    return {label: cmap(i % cmap.N) for i, label in enumerate(sorted(labels))}


def _save(fig: Figure, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    return path


def _round_axis(ax) -> None:
    """Rounds are whole numbers: integer ticks only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Figure, axes, order: Callable[[str], object] | None = None) -> None:
    """One legend for the figure, each label once (sorted by `order` when given)."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if order is not None and handles:
        labels, handles = map(
            list,
            zip(
                *sorted(zip(labels, handles, strict=True), key=lambda lh: order(lh[0])), strict=True
            ),
        )
    if handles:
        fig.legend(handles, labels, loc='outside right upper', fontsize=8)


# -------------------------------------------------------------------------------------------------
# Curves
# -------------------------------------------------------------------------------------------------


def plot_metric_vs_round(runs: Sequence[Run], out_dir: str, task: str) -> str | None:
    key = f'eval/{main_metric(task)}'
    facets = _facets(runs)
    colours = _colours({r.label for r in runs})
    fig, axes = _new_figure(len(facets))
    for ax, facet in zip(axes, facets, strict=True):
        for label, group in sorted(
            _group([r for r in runs if r.partition_label == facet], lambda r: r.label).items()
        ):
            xs, mean, std = _mean_series([r.series(key) for r in group])
            if not len(xs):
                continue
            ax.plot(xs, mean, marker='.', color=colours[label], label=label)
            if len(group) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=colours[label], alpha=0.15)
        ax.set(title=facet, xlabel='round')
        _round_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_NAME[main_metric(task)] + ' (global test)')
    _legend(fig, axes)
    return _save(fig, out_dir, f'{task}_metric_vs_round.png')


def plot_epsilon_vs_round(runs: Sequence[Run], out_dir: str, task: str) -> str | None:
    dp_runs = [r for r in runs if r.series('privacy/epsilon')[0].size]
    if not dp_runs:
        return None
    facets = _facets(dp_runs)
    colours = _colours({r.label for r in dp_runs})
    fig, axes = _new_figure(len(facets))
    for ax, facet in zip(axes, facets, strict=True):
        for label, group in sorted(
            _group([r for r in dp_runs if r.partition_label == facet], lambda r: r.label).items()
        ):
            xs, mean, _ = _mean_series([r.series('privacy/epsilon') for r in group])
            ax.plot(xs, mean, marker='.', color=colours[label], label=label)
        ax.axhline(
            PAPER_EPSILON_BOUND,
            color='grey',
            ls=':',
            lw=1,
            label=f'paper bound ε<{PAPER_EPSILON_BOUND:g}',
        )
        ax.set(title=facet, xlabel='round')
        _round_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('ε spent (max over hospitals)')
    _legend(fig, axes)
    return _save(fig, out_dir, f'{task}_epsilon_vs_round.png')


def _has_dp(run: Run) -> bool:
    return run.config['dp']['mode'] != 'none'


def privacy_utility_points(runs: Sequence[Run]) -> list[tuple]:
    """(mean achieved ε, mean final metric, its std) per DP setting of the DP runs, sorted by ε.
    Settings are told apart by `dp_label`, so runs with a fixed σ are never averaged with runs
    of a target ε. Runs without DP have no ε: they are `no_dp_reference`."""
    points = []
    for same in _group([r for r in runs if _has_dp(r)], lambda r: r.dp_label).values():
        eps = [r.epsilon for r in same if math.isfinite(r.epsilon)]
        if eps:
            y = [r.final_metric for r in same]
            points.append((float(np.mean(eps)), float(np.nanmean(y)), float(np.nanstd(y))))
    return sorted(points)


def no_dp_reference(runs: Sequence[Run]) -> tuple[float, float] | None:
    """(mean, std) of the final metric of the runs without DP, None if there are none."""
    y = [r.final_metric for r in runs if not _has_dp(r)]
    return (float(np.nanmean(y)), float(np.nanstd(y))) if y else None


def plot_privacy_utility(runs: Sequence[Run], out_dir: str, task: str) -> str | None:
    if not any(_has_dp(r) for r in runs):
        return None
    facets = _facets(runs)
    algorithms = sorted({r.algorithm for r in runs})
    colours = _colours(algorithms)
    eps = [r.epsilon for r in runs if _has_dp(r) and math.isfinite(r.epsilon)]
    fig, axes = _new_figure(len(facets))
    for ax, facet in zip(axes, facets, strict=True):
        for algorithm in algorithms:
            group = [r for r in runs if r.partition_label == facet and r.algorithm == algorithm]
            dp = [r for r in group if _has_dp(r) and math.isfinite(r.epsilon)]
            ax.scatter(
                [r.epsilon for r in dp],
                [r.final_metric for r in dp],
                color=colours[algorithm],
                alpha=0.35,
                s=14,
            )
            points = privacy_utility_points(group)
            if points:
                px, py, ps = map(np.array, zip(*points, strict=True))
                ax.errorbar(
                    px,
                    py,
                    yerr=ps,
                    color=colours[algorithm],
                    marker='o',
                    capsize=3,
                    label=f'{algorithm}, DP',
                )
            reference = no_dp_reference(group)
            if reference:  # no ε to put it at: a line across the ε axis
                mean, std = reference
                ax.axhline(
                    mean, color=colours[algorithm], ls='--', lw=1.2, label=f'{algorithm}, no DP'
                )
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=colours[algorithm], alpha=0.1, lw=0)
        ax.axvline(
            PAPER_EPSILON_BOUND,
            color='grey',
            ls=':',
            lw=1,
            label=f'paper bound ε<{PAPER_EPSILON_BOUND:g}',
        )
        ax.set_xlim(0, 1.08 * max([PAPER_EPSILON_BOUND, *eps]))
        ax.set(title=facet, xlabel='achieved ε (max over hospitals)')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('final ' + METRIC_NAME[main_metric(task)])
    # Each algorithm's DP and no-DP entries together, the paper's bound last.
    _legend(fig, axes, order=lambda label: (label.startswith('paper'), label))
    return _save(fig, out_dir, f'{task}_privacy_utility.png')


def plot_comm_utility(runs: Sequence[Run], out_dir: str, task: str) -> str | None:
    key = f'eval/{main_metric(task)}'
    federated = [r for r in runs if r.config['mode'] == 'federated']
    if not federated:
        return None
    facets = _facets(federated)
    colours = _colours({r.label for r in federated})
    fig, axes = _new_figure(len(facets))
    for ax, facet in zip(axes, facets, strict=True):
        for label, group in sorted(
            _group([r for r in federated if r.partition_label == facet], lambda r: r.label).items()
        ):
            curves = []
            for r in group:
                mb = dict(
                    zip([row['round'] for row in r.rows], r.bytes_per_hospital() / 1e6, strict=True)
                )
                rounds, values = r.series(key)
                curves.append((np.array([mb[x] for x in rounds]), values))
            xs, mean, _ = _mean_series(curves)
            ax.plot(xs, mean, marker='.', color=colours[label], label=label)
        central = [
            r.final_metric
            for r in runs
            if r.algorithm == 'centralized'
            and r.partition_label == facet
            and r.config['dp']['mode'] == 'none'
        ]
        if central:
            ax.axhline(
                np.nanmean(central),
                color='black',
                ls='--',
                lw=1,
                label='centralised (no DP), final',
            )
        ax.set(title=facet, xlabel='cumulative MB per hospital (up + down)')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(METRIC_NAME[main_metric(task)])
    _legend(fig, axes)
    return _save(fig, out_dir, f'{task}_comm_utility.png')


def plot_hospital_fairness(runs: Sequence[Run], out_dir: str, task: str) -> str | None:
    runs = [r for r in runs if r.hospital_metrics()]
    if not runs:
        return None
    facets = _facets(runs)
    colours = _colours({r.label for r in runs})
    fig, axes = _new_figure(len(facets), height=3.8)
    for ax, facet in zip(axes, facets, strict=True):
        groups = sorted(
            _group([r for r in runs if r.partition_label == facet], lambda r: r.label).items()
        )
        hospitals = sorted({h for _, g in groups for r in g for h in r.hospital_metrics()})
        width = 0.8 / max(len(groups), 1)
        for i, (label, group) in enumerate(groups):
            values = np.array(
                [[r.hospital_metrics().get(h, math.nan) for h in hospitals] for r in group]
            )
            x = np.arange(len(hospitals)) + (i - (len(groups) - 1) / 2) * width
            ax.bar(
                x,
                np.nanmean(values, 0),
                width,
                yerr=np.nanstd(values, 0) if len(group) > 1 else None,
                color=colours[label],
                label=label,
            )
        ax.set_xticks(np.arange(len(hospitals)), [h.replace('hospital_', 'H') for h in hospitals])
        ax.set(title=facet, xlabel='hospital (own test split)')
        ax.grid(alpha=0.3, axis='y')
    axes[0].set_ylabel(METRIC_NAME[main_metric(task)])
    _legend(fig, axes)
    return _save(fig, out_dir, f'{task}_hospital_fairness.png')


# -------------------------------------------------------------------------------------------------
# Models: restore a run's parameters and its test data
# -------------------------------------------------------------------------------------------------


def has_checkpoint(run: Run) -> bool:
    ckpt = os.path.join(run.path, 'checkpoints')
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def load_model(run: Run) -> Callable:
    """`apply(images) -> logits` with the run's latest checkpointed parameters (jitted).

    A 'local' run holds one model per hospital; hospital 0's is used.
    """
    import jax
    import ml_collections

    from fedjax_med.checkpoint import Checkpointer
    from fedjax_med.models import build_model

    config = ml_collections.ConfigDict(run.config)
    model = build_model(config.model, config.task)
    checkpointer = Checkpointer(os.path.join(run.path, 'checkpoints'))
    try:
        state, _ = checkpointer.restore_arrays()
    finally:
        checkpointer.close()
    params = state['params']
    if config.mode == 'local':
        params = jax.tree.map(lambda x: x[0], params)
    return jax.jit(lambda images: model.apply(params, images))


def load_test_split(run: Run) -> dict:
    """The run's global test split, re-created from its config (same seed, same hospitals), in
    its storage dtypes: decode (`storage.decode`) only the examples a figure shows."""
    import ml_collections

    from fedjax_med.data import sources

    config = ml_collections.ConfigDict(run.config)
    return sources.load_federated(config.data, config.seed).test


def _pick_pair(runs: Sequence[Run]) -> list[Run]:
    """A federated (FedAvg) and a centralised run trained alike (partition, seed, DP), else the
    first one or two runs with a checkpoint. Runs without DP are preferred."""
    runs = sorted(
        (r for r in runs if has_checkpoint(r)),
        key=lambda r: (
            r.config['dp']['mode'] != 'none',
            r.dp_target,
            r.partition != 'iid',
            r.seed,
            r.path,
        ),
    )
    for fed in (r for r in runs if r.config['mode'] == 'federated'):
        for central in (r for r in runs if r.algorithm == 'centralized'):
            if (central.partition_label, central.seed, central.dp_label) == (
                fed.partition_label,
                fed.seed,
                fed.dp_label,
            ):
                return [fed, central]
    return runs[:2]


def _short(run: Run) -> str:
    return f'{run.algorithm} ({run.dp_label}, {run.partition_label}, seed {run.seed})'


def largest_tumours(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n examples with the most whole-tumour pixels (voxels), largest first."""
    # int64: the labels are uint8, and negating unsigned areas to sort them would wrap around.
    area = np.asarray(labels)[..., 0].reshape(len(labels), -1).sum(1, dtype=np.int64)
    return np.argsort(-area, kind='stable')[:n]


def plot_brats_overlays(runs: Sequence[Run], out_dir: str, num_examples: int = 3) -> str | None:
    """FLAIR (channel 0) with WT/TC/ET contours: truth, then each model's prediction. 3-D patches
    are shown by their axial slice with the most tumour."""
    chosen = _pick_pair(runs)
    if not chosen:
        return None
    test = load_test_split(chosen[0])
    idx = largest_tumours(test['label'], num_examples)  # they show all three regions
    shown = storage.decode({'image': test['image'][idx], 'label': test['label'][idx]})
    images, labels = shown['image'], shown['label']
    predictions = [np.asarray(load_model(r)(images)) > 0 for r in chosen]
    if images.ndim == 5:
        from fedjax_med.data import mri

        rows = np.arange(len(idx))
        z = np.array([mri.largest_tumour_slice(label) for label in labels], np.int64)
        images, labels = images[rows, z], labels[rows, z]
        predictions = [p[rows, z] for p in predictions]
    columns = [('ground truth', labels)] + [
        (_short(r), p) for r, p in zip(chosen, predictions, strict=True)
    ]
    fig = Figure(figsize=(3.2 * len(columns), 3.1 * len(idx) + 0.4), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(idx), len(columns), squeeze=False)
    for row in range(len(idx)):
        for col, (title, masks) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(images[row, ..., 0], cmap='gray')
            draw_regions(ax, masks[row])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
    region_legend(fig)
    return _save(fig, out_dir, 'brats_overlays.png')


def draw_regions(ax, masks: np.ndarray) -> list:
    """Contours of the WT, TC, ET masks [H, W, 3] on `ax`, in that order, each on top of the one
    before (`REGION_STYLES`), so coinciding contours stay visible. Returns the contour sets."""
    drawn = []
    for c, (region, colour) in enumerate(REGION_COLOURS.items()):
        mask = np.asarray(masks[..., c], float)
        if mask.min() != mask.max():
            width, style = REGION_STYLES[region]
            drawn.append(
                ax.contour(
                    mask,
                    levels=[0.5],
                    colors=[colour],
                    linewidths=[width],
                    linestyles=[style],
                    zorder=2 + c,
                )
            )
    return drawn


def region_legend(fig: Figure):
    """One legend for the figure: each region's colour and line style, with its name."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=REGION_COLOURS[r], lw=REGION_STYLES[r][0], ls=REGION_STYLES[r][1])
        for r in REGION_COLOURS
    ]
    labels = [f'{r} ({REGION_NAMES[r]})' for r in REGION_COLOURS]
    return fig.legend(
        handles, labels, loc='outside lower center', ncols=len(labels), fontsize=8, frameon=False
    )


# Long on purpose: picking the images, computing both models' maps and drawing the grid share
# the same per-image state; split up, each part would need all of it passed along.
def plot_cxr_attribution(
    runs: Sequence[Run], out_dir: str, num_examples: int = 3, steps: int = 32
) -> tuple[str | None, dict]:
    """Integrated gradients of the two models `_pick_pair` chooses on the same images (a
    federated and a centralised one trained alike when both exist; `attribution_caption` says
    which were compared).

    Each row explains one test image for one finding the image has (the finding the first model
    scores highest among its true findings). Agreement: Spearman rank correlation of the two
    |IG| maps and the IoU of their top-10% pixels (see attribution.py), per image and averaged.
    """
    import jax.numpy as jnp

    from fedjax_med import attribution
    from fedjax_med.data.nih_metadata import CXR_LABELS

    chosen = _pick_pair(runs)
    if not chosen:
        return None, {}
    test = load_test_split(chosen[0])
    positive = np.flatnonzero(test['label'].sum(1) > 0)
    idx = (positive if len(positive) else np.arange(len(test['label'])))[:num_examples]
    shown = storage.decode({'image': test['image'][idx], 'label': test['label'][idx]})
    images, labels = jnp.asarray(shown['image']), shown['label']
    models = [load_model(r) for r in chosen]
    probs = np.asarray(models[0](images))
    # Explain a finding the image has; without one, the model's top finding.
    scores = np.where(labels > 0, probs, -np.inf) if labels.sum() else probs
    classes = scores.argmax(1)
    maps = [
        np.asarray(
            attribution.saliency(
                attribution.model_integrated_gradients(m, images, classes, steps=steps)
            )
        )
        for m in models
    ]
    per_image = []
    if len(maps) == 2:
        for a, b in zip(*maps, strict=True):
            per_image.append(
                {
                    'spearman': float(attribution.spearman(a, b)),
                    'top10_iou': float(attribution.topk_overlap(a, b, 0.1)),
                }
            )
    fig = Figure(figsize=(3.0 * (1 + len(maps)), 3.0 * len(idx) + 0.4), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(idx), 1 + len(maps), squeeze=False)
    for row in range(len(idx)):
        finding = CXR_LABELS[classes[row]]
        axes[row, 0].imshow(np.asarray(images[row, ..., 0]), cmap='gray')
        axes[row, 0].set_title(
            f'{finding}' + (' (label)' if labels[row, classes[row]] else ''), fontsize=8
        )
        for col, (run, sal) in enumerate(zip(chosen, maps, strict=True), start=1):
            axes[row, col].imshow(np.asarray(images[row, ..., 0]), cmap='gray')
            axes[row, col].imshow(sal[row], cmap='inferno', alpha=0.6)
            title = f'IG: {run.algorithm} ({run.dp_label})'
            if col == len(maps) and per_image:
                title += (
                    f'\nρ={per_image[row]["spearman"]:.2f}, '
                    f'top-10% IoU={per_image[row]["top10_iou"]:.2f}'
                )
            axes[row, col].set_title(title, fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    agreement = {}
    if per_image:
        agreement = {
            'models': [r.path for r in chosen],
            'steps': steps,
            'per_image': per_image,
            'mean_spearman': float(np.mean([p['spearman'] for p in per_image])),
            'mean_top10_iou': float(np.mean([p['top10_iou'] for p in per_image])),
        }
    return _save(fig, out_dir, 'chestxray14_attribution.png'), agreement


# -------------------------------------------------------------------------------------------------
# The page
# -------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 4) -> str:
    return '' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def _runs_table(runs: Sequence[Run]) -> str:
    head = (
        'run',
        'task',
        'algorithm',
        'DP',
        'partition',
        'seed',
        'rounds',
        'final metric',
        'best metric',
        'ε',
        'MB / hospital',
        'train s',
    )
    rows = []
    for r in runs:
        cells = (
            r.name,
            r.task,
            r.algorithm,
            r.dp_label,
            r.partition_label,
            r.seed,
            f'{len(r.rows)}/{r.config["num_rounds"]}' + ('' if r.finished else ' (running)'),
            f'{_fmt(r.final_metric)} {r.main_metric}',
            _fmt(r.best_metric),
            _fmt(r.epsilon, 2),
            _fmt(r.total_bytes_per_hospital / 1e6, 3),
            _fmt(r.wall_time_s, 1),
        )
        rows.append('<tr>' + ''.join(f'<td>{html.escape(str(c))}</td>' for c in cells) + '</tr>')
    return (
        '<table><tr>'
        + ''.join(f'<th>{h}</th>' for h in head)
        + '</tr>\n'
        + '\n'.join(rows)
        + '</table>'
    )


CAPTIONS = {
    'metric_vs_round': 'Global test metric per round (mean over seeds; band ±1 std).',
    'epsilon_vs_round': "Privacy spent per round (max over hospitals); dotted: the paper's "
    f'bound ε<{PAPER_EPSILON_BOUND:g}.',
    'privacy_utility': 'Privacy–utility: final metric vs achieved ε of the DP runs (mean ± std '
    'over seeds; faint dots are single runs). Runs without DP have no ε: '
    'dashed horizontal line per algorithm (band ±1 std over seeds). Dotted: '
    f"the paper's bound ε<{PAPER_EPSILON_BOUND:g}.",
    'comm_utility': 'Communication–utility: metric vs cumulative MB per hospital. The paper '
    f'reports < {PAPER_MB_PER_HOSPITAL:g} MB per hospital.',
    'hospital_fairness': "Fairness: each hospital's metric on its own test split (last "
    "evaluation; local runs use each hospital's own model).",
    'brats_overlays': 'BraTS: FLAIR with the contours of WT (yellow, wide), TC (red, narrow, '
    'on top of WT) and ET (cyan, dashed, on top of both), so that borders '
    'the regions share stay visible; ground truth, then each model.',
}


def _training(run: Run) -> str:
    mode = run.config['mode']
    if mode == 'federated':
        return f'federated {run.algorithm}'
    return {'centralized': 'centralised', 'local': 'local-only'}.get(mode, mode)


def attribution_caption(chosen: Sequence[Run]) -> str:
    """The caption of the attribution figure: which runs it compares and how they differ."""
    head = 'Chest X-ray: integrated gradients (|IG| summed over channels, black baseline) of '
    if len(chosen) < 2:
        model = f'one model, {_short(chosen[0])}' if chosen else 'no model'
        return head + model + ' (no second run with a checkpoint to compare it with).'
    a, b = chosen[:2]
    differ = []
    if a.algorithm != b.algorithm:
        differ.append(f'training ({_training(a)} vs {_training(b)})')
    if a.dp_label != b.dp_label:
        differ.append(f'privacy ({a.dp_label} vs {b.dp_label})')
    if a.partition_label != b.partition_label:
        differ.append(f'partition ({a.partition_label} vs {b.partition_label})')
    if a.seed != b.seed:
        differ.append(f'seed ({a.seed} vs {b.seed})')
    how = ('; they differ in ' + ' and '.join(differ)) if differ else ''
    return head + f'{_short(a)} and {_short(b)} for the same finding{how}.'


def _caption(png: str, captions: dict[str, str] | None = None) -> str:
    """`captions` (file name -> caption) first, then the fixed CAPTIONS by file name ending."""
    if captions and os.path.basename(png) in captions:
        return captions[os.path.basename(png)]
    stem = os.path.splitext(os.path.basename(png))[0]
    for key, text in CAPTIONS.items():
        if stem.endswith(key):
            return text
    return ''


def audit_section(run: Run, out_dir: str) -> str:
    """HTML for the run's audit.json ('' if it has none): what an attacker can do with it."""
    result = _read_json(os.path.join(run.path, 'audit.json'))
    if not result:
        return ''
    rows = ''.join(
        f'<tr><td>{html.escape(name)}</td><td>{_fmt(m["auc"], 3)}</td>'
        f'<td>{_fmt(m["tpr_at_fpr_1pct"], 3)}</td><td>{_fmt(m["tpr_at_fpr_0.1pct"], 3)}</td>'
        f'<td>{m["num_members"]} / {m["num_nonmembers"]}</td></tr>'
        for name, m in result.get('mia', {}).items()
    )
    parts = [
        f'<h2>What an attacker can do: {html.escape(run.name)}</h2>',
        '<p>Membership inference on the released model (loss threshold; members: the '
        "hospital's training examples, non-members: its test split).</p>",
        '<table><tr><th>hospital</th><th>AUC</th><th>TPR at FPR 1%</th><th>TPR at FPR 0.1%</th>'
        f'<th>members / non-members</th></tr>{rows}</table>',
    ]
    audit = (result.get('canary_audit') or {}).get('rescored')
    if audit:
        eps = audit.get('accountant_epsilon')
        parts.append(
            f'<p>One-run canary audit: ε ≥ {_fmt(audit["epsilon_lower"], 3)} at '
            f'{audit["confidence"]:.0%} confidence ({audit["correct"]} of {audit["guesses"]} '
            f'guesses right, {audit["num_canaries"]} canaries, δ = {audit["delta"]:.3g}); '
            + (f"the accountant's ε: {_fmt(eps, 3)}." if eps is not None else 'no DP.')
            + '</p>'
        )
    png = os.path.join(run.path, 'audit_roc.png')
    if os.path.exists(png):
        src = html.escape(os.path.relpath(png, out_dir))
        parts.append(f'<img src="{src}" alt="audit of {html.escape(run.name)}">')
    return '\n'.join(parts)


def write_index(
    out_dir: str,
    runs: Sequence[Run],
    pngs: Sequence[str],
    agreement: dict,
    captions: dict[str, str] | None = None,
) -> str:
    parts = [
        '<!doctype html><html><head><meta charset="utf-8"><title>fedjax_med report</title>',
        '<style>body{font-family:sans-serif;margin:2em;max-width:1400px}'
        'table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;'
        'padding:2px 6px}img{max-width:100%;border:1px solid #eee}</style></head><body>',
        '<h1>fedjax_med report</h1>',
        f'<p>{len(runs)} run(s).</p>',
        _runs_table(runs),
    ]
    for png in pngs:
        name = os.path.basename(png)
        caption = html.escape(_caption(png, captions))
        parts.append(
            f'<h2>{html.escape(name)}</h2><p>{caption}</p>'
            f'<img src="{html.escape(name)}" alt="{html.escape(name)}">'
        )
        if name == 'chestxray14_attribution.png' and agreement:
            parts.append(
                f"<p>Agreement between the two models' attribution maps over "
                f'{len(agreement["per_image"])} images: mean Spearman ρ = '
                f'{agreement["mean_spearman"]:.3f}, mean top-10% IoU = '
                f'{agreement["mean_top10_iou"]:.3f} (1 = identical ranking / same pixels; '
                f'{agreement["steps"]} integration steps).</p>'
            )
    parts += [section for section in (audit_section(r, out_dir) for r in runs) if section]
    parts.append('</body></html>')
    path = os.path.join(out_dir, 'index.html')
    with open(path, 'w') as f:
        f.write('\n'.join(parts))
    return path


def make_report(
    dirs: Sequence[str],
    out: str | None = None,
    *,
    models: bool = True,
    ig_steps: int = 32,
    num_examples: int = 3,
) -> list[str]:
    """Writes the figures and index.html for the runs in or below `dirs`; returns the PNG paths.

    Args:
      dirs: run directories or folders with runs below them.
      out: output folder (default: dirs[0]).
      models: also draw the figures that restore models (BraTS overlays, CXR attribution).
      ig_steps: integration steps of integrated gradients.
      num_examples: test images per model figure.
    """
    runs = find_runs(dirs)
    out = out or dirs[0]
    os.makedirs(out, exist_ok=True)
    pngs, agreement, captions = [], {}, {}
    for task in sorted({r.task for r in runs}):
        task_runs = [r for r in runs if r.task == task]
        for plot in (
            plot_metric_vs_round,
            plot_epsilon_vs_round,
            plot_privacy_utility,
            plot_comm_utility,
            plot_hospital_fairness,
        ):
            pngs.append(plot(task_runs, out, task))
        if models and task == 'brats':
            pngs.append(plot_brats_overlays(task_runs, out, num_examples))
        if models and task == 'chestxray14':
            png, agreement = plot_cxr_attribution(task_runs, out, num_examples, ig_steps)
            pngs.append(png)
            if png:
                captions[os.path.basename(png)] = attribution_caption(_pick_pair(task_runs))
            if agreement:
                with open(os.path.join(out, 'attribution_agreement.json'), 'w') as f:
                    json.dump(agreement, f, indent=2)
    pngs = [p for p in pngs if p]
    write_index(out, runs, pngs, agreement, captions)
    return pngs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('dirs', nargs='+', help='run workdirs or folders holding runs')
    parser.add_argument('--out', default=None, help='output folder (default: the first DIR)')
    parser.add_argument(
        '--no_models',
        action='store_true',
        help='skip the figures that restore models (overlays, attribution)',
    )
    parser.add_argument('--ig_steps', type=int, default=32, help='integrated-gradients steps')
    parser.add_argument('--num_examples', type=int, default=3, help='images per model figure')
    args = parser.parse_args(argv)
    pngs = make_report(
        args.dirs,
        args.out,
        models=not args.no_models,
        ig_steps=args.ig_steps,
        num_examples=args.num_examples,
    )
    out = args.out or args.dirs[0]
    print(f'Wrote {len(pngs)} figures and {os.path.join(out, "index.html")}')


if __name__ == '__main__':
    main()
