"""The paper's experiment grid: every run, then results.csv, results.md and the report figures.

  python launch/experiments.py --suite=paper --workdir=runs/grid                 # synthetic twins
  python launch/experiments.py --suite=paper --workdir=runs/grid --data_dir=~/tensorflow_datasets
  python launch/experiments.py --suite=smoke --workdir=/tmp/grid   # 12 runs: ~1.5 min on 2 CPU
                                  # cores with a warm compilation cache, ~4 min cold
  python launch/experiments.py --suite=paper --workdir=runs/grid --tasks=brats \
      --algorithms=centralized,fedavg --partitions=iid,dirichlet0.1 --dp_epsilons=4.5  # a slice
  python launch/experiments.py --suite=paper --workdir=runs/small --seeds=1 --num_rounds=10 \
      --dp_algorithms=centralized,fedavg --set=data.num_train=1500   # a reduced-scale grid

Grid (per task, per seed):
  algorithms   centralized (all hospitals' data pooled), fedavg, fedprox (mu = 0.01),
               local (each hospital alone; metrics averaged over the hospitals' models)
  privacy      no DP for every algorithm; sample-level DP-SGD calibrated to target epsilon 2.5
               and 4.5 for centralized, fedavg and fedprox (the smoke suite: 4.5 for centralized
               and fedavg). DP runs use Poisson sampling, as the accounting requires.
  partitions   IID, Dirichlet alpha = 0.1 and 1.0 over five hospitals (smoke: IID and 0.1,
               with the smoke configs' hospitals)
  seeds        --seeds (paper default 3; smoke 1)
Configs: the 'synthetic' variant of configs/<task>.py, or the '' (paper, real data) variant when
--data_dir is given; the smoke suite uses 'smoke' with 2 rounds.

Each run gets its own folder under --workdir/<task>/, named from its settings. A run whose
summary.json exists is skipped, and an unfinished one resumes from its checkpoint (train.run), so
rerunning the same command continues the grid. All runs share one process (and a persistent
compilation cache, --jax_cache_dir), so runs with equal shapes compile once.

results.csv has one row per run:
  final/best_metric  the global test main metric (chest X-ray mean AUROC, BraTS mean Dice) at
                     the last evaluation / the best evaluation;
  rounds_to_95pct_centralized  first evaluated round at which the run reaches 95% of the final
                     metric of the centralised run with the same task, partition, seed and DP
                     target (the no-DP centralised run when that DP target has none); empty if
                     never reached or no such centralised run exists;
  bytes_per_hospital cumulative bytes up + down per hospital (0 for centralised and local runs);
  wall_time_s        sum of the rounds' times (training incl. compilation; over resumptions);
  device             the JAX devices the run trained on.
results.md holds mean ± std over seeds of the same settings.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:  # first, ahead of any installed package named `configs`
    sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not installed

from configs import brats, chestxray14  # noqa: E402
from fedjax_med import report  # noqa: E402

_SUITE = flags.DEFINE_enum('suite', 'paper', ['paper', 'smoke', 'nih_scale'], 'Which grid to run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for every run and the results.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir',
    None,
    'TFDS data dir of the built real datasets; if given, the paper '
    "('' variant) configs on real data are used instead of synthetic.",
)
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds 0..N-1 (default: paper 3, smoke 1).')
_TASKS = flags.DEFINE_list(
    'tasks', None, 'Tasks to run (default: paper chestxray14,brats; smoke brats).'
)
_ALGORITHMS = flags.DEFINE_list(
    'algorithms', None, "Subset of the suite's algorithms (centralized, fedavg, fedprox, local)."
)
_PARTITIONS = flags.DEFINE_list(
    'partitions',
    None,
    "Subset of the suite's partitions, named as in the run folders "
    '(iid, dirichlet0.1, dirichlet1).',
)
_DP_EPSILONS = flags.DEFINE_list(
    'dp_epsilons', None, "DP targets instead of the suite's (empty string: no DP runs)."
)
_DP_ALGORITHMS = flags.DEFINE_list(
    'dp_algorithms', None, "Algorithms that also run with DP (default: the suite's)."
)
_NUM_ROUNDS = flags.DEFINE_integer('num_rounds', None, "Override every run's num_rounds.")
_SET = flags.DEFINE_list(
    'set',
    [],
    'Config overrides for every run, FIELD=VALUE with dotted fields, e.g. '
    "--set=data.num_train=1500,local.epochs=2 (applied before the grid's "
    'own settings).',
)
_REPORT = flags.DEFINE_bool('report', True, 'Also write the report figures and index.html.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Only list the runs of the grid.')
_JAX_CACHE = flags.DEFINE_string(
    'jax_cache_dir',
    None,
    'Persistent compilation cache (default WORKDIR/.jax_cache; '
    "'' disables; JAX_COMPILATION_CACHE_DIR takes precedence).",
)

CONFIG_MODULES = {'chestxray14': chestxray14, 'brats': brats}
# algorithm -> (config.mode, local.prox_mu)
ALGORITHMS = {
    'centralized': ('centralized', 0.0),
    'fedavg': ('federated', 0.0),
    'fedprox': ('federated', 0.01),
    'local': ('local', 0.0),
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """A grid: the product of its fields (DP targets only for `dp_algorithms`)."""

    variant: str
    tasks: tuple[str, ...]
    algorithms: tuple[str, ...]
    dp_epsilons: tuple[float, ...]
    dp_algorithms: tuple[str, ...]
    partitions: tuple[tuple[str, float | None], ...]  # (partition, dirichlet alpha)
    seeds: int
    num_clients: int | None  # None keeps the config's
    num_rounds: int | None
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted field, value) for every run
    dp_variant: str | None = None  # config variant of the DP runs (None: `variant` + DP)
    # Each DP setting also runs warm-started from a model pretrained on the public set alone
    # (one pretraining run per task and seed: `variant`'s public set, config.data.train_on).
    warm_start: bool = False
    pretrain_variant: str | None = None
    # (algorithm, dotted field, value): settings of one algorithm's runs only (e.g. the
    # centralised baseline's own schedule).
    algorithm_overrides: tuple[tuple[str, str, str], ...] = ()


SUITES = {
    'paper': Suite(
        variant='synthetic',
        tasks=('chestxray14', 'brats'),
        algorithms=tuple(ALGORITHMS),
        dp_epsilons=(2.5, 4.5),
        dp_algorithms=('centralized', 'fedavg', 'fedprox'),
        partitions=(('iid', None), ('dirichlet', 0.1), ('dirichlet', 1.0)),
        seeds=3,
        num_clients=5,
        num_rounds=None,
    ),
    'smoke': Suite(
        variant='smoke',
        tasks=('brats',),
        algorithms=tuple(ALGORITHMS),
        dp_epsilons=(4.5,),
        dp_algorithms=('centralized', 'fedavg'),
        partitions=(('iid', None), ('dirichlet', 0.1)),
        seeds=1,
        num_clients=None,
        num_rounds=2,
    ),
    # Hospital scale (chest X-ray twin with every row of the NIH table; configs/chestxray14.py
    # nih_scale): the privacy-utility question at the size it is asked at.
    'nih_scale': Suite(
        variant='nih_scale',
        tasks=('chestxray14',),
        algorithms=('centralized', 'fedavg', 'local', 'fedprox'),
        dp_epsilons=(4.5, 2.5),
        dp_algorithms=('fedavg',),
        partitions=(('dirichlet', 0.5),),
        seeds=3,
        num_clients=None,
        num_rounds=None,
        dp_variant='nih_scale_dp',
        warm_start=True,
        pretrain_variant='nih_public',
        # Centralised training converges in 5 epochs of the pooled data (the
        # calibration run); the hospitals get 0.5 local epochs a round.
        algorithm_overrides=(('centralized', 'local.epochs', '0.1'),),
    ),
}


def partition_name(partition: str, alpha: float | None) -> str:
    return partition if alpha is None else f'{partition}{alpha:g}'


@dataclasses.dataclass(frozen=True)
class RunSpec:
    task: str
    algorithm: str
    dp_epsilon: float  # 0 = no DP
    partition: str
    alpha: float | None
    seed: int
    warm: bool = False  # starts from the public pretraining run of its task and seed
    pretrain: bool = False  # the public pretraining run itself (algorithm 'centralized')

    @property
    def name(self) -> str:
        if self.pretrain:
            return f'public-pretrain-seed{self.seed}'
        dp = f'eps{self.dp_epsilon:g}' if self.dp_epsilon else 'nodp'
        part = partition_name(self.partition, self.alpha)
        return f'{self.algorithm}-{dp}-{part}{"-warm" if self.warm else ""}-seed{self.seed}'

    def pretrain_spec(self) -> RunSpec:
        return dataclasses.replace(
            self, algorithm='centralized', dp_epsilon=0.0, warm=False, pretrain=True
        )


def _rank(spec: RunSpec) -> tuple:
    """Order inside a seed: what the others are measured against first (pretraining,
    centralised, FedAvg), then DP from the largest epsilon, warm start before cold, then the
    rest."""
    first = ('centralized', 'fedavg')
    algo = first.index(spec.algorithm) if spec.algorithm in first else len(first)
    return (not spec.pretrain, algo, spec.dp_epsilon > 0, -spec.dp_epsilon, not spec.warm)


def grid(suite: Suite) -> list[RunSpec]:
    """Every run of the suite; centralised runs first (the others are measured against them)."""
    specs = []
    for task in suite.tasks:
        for seed in range(suite.seeds):
            for partition, alpha in suite.partitions:
                for algorithm in suite.algorithms:
                    targets = (
                        (0.0, *suite.dp_epsilons) if algorithm in suite.dp_algorithms else (0.0,)
                    )
                    specs += [
                        RunSpec(task, algorithm, eps, partition, alpha, seed) for eps in targets
                    ]
                    if suite.warm_start:
                        specs += [
                            RunSpec(task, algorithm, eps, partition, alpha, seed, warm=True)
                            for eps in targets
                            if eps
                        ]
            if suite.warm_start:
                specs.append(specs[-1].pretrain_spec())
    return sorted(specs, key=lambda s: (s.task, s.seed, _rank(s)))


def make_config(spec: RunSpec, suite: Suite, data_dir: str | None, workdir: str = '.'):
    """The run's config: the task's variant with the grid's settings applied."""
    variant = suite.variant
    if spec.pretrain:
        variant = suite.pretrain_variant
    elif spec.dp_epsilon and suite.dp_variant:
        variant = suite.dp_variant
    config = CONFIG_MODULES[spec.task].get_config('' if data_dir else variant)
    if spec.pretrain:  # the pretraining variant's own set-up, with the grid's seed and data
        for field, value in suite.overrides:
            apply_override(config, field, value)
        config.seed = spec.seed
        return config
    if data_dir:
        config.data.data_dir = data_dir
    for field, value in suite.overrides:
        apply_override(config, field, value)
    for algorithm, field, value in suite.algorithm_overrides:
        if algorithm == spec.algorithm:
            apply_override(config, field, value)
    mode, prox_mu = ALGORITHMS[spec.algorithm]
    config.mode = mode
    config.local.prox_mu = prox_mu
    config.seed = spec.seed
    config.data.partition = spec.partition
    if spec.alpha is not None:
        config.data.dirichlet_alpha = spec.alpha
    if suite.num_clients:
        config.data.num_clients = suite.num_clients
    if suite.num_rounds:
        config.num_rounds = suite.num_rounds
        config.checkpoint_every = suite.num_rounds  # smoke: one checkpoint, at the end
    if spec.dp_epsilon:
        config.dp.mode = 'sample'
        config.dp.target_epsilon = spec.dp_epsilon
        config.local.sampling = 'poisson'  # the accounting assumes Poisson subsampling
    else:
        config.dp.mode = 'none'
        config.dp.target_epsilon = 0.0
        config.local.sampling = 'shuffle'
    if spec.warm:
        config.init_from = os.path.abspath(
            os.path.join(workdir, spec.task, spec.pretrain_spec().name)
        )
    return config


def apply_override(config, field: str, value: str) -> None:
    """Sets config.<field> (dotted) from text, converted to the field's current type."""
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
        node = node.get(name) if hasattr(node, 'get') else None
    if node is None or not hasattr(node, 'get') or leaf not in node:
        raise app.UsageError(
            f'--set: unknown config field {field!r}; see configs/base.py for the fields.'
        )
    # An unset optional field (a placeholder, e.g. dp.fast_clipping) holds None: take the type the
    # placeholder declares, as ml_collections checks it on assignment.
    field_type = getattr(node.get_ref(leaf), 'get_type', lambda: None)()
    kind = type(node[leaf]) if node[leaf] is not None else field_type or str
    try:
        if kind is bool:
            if value.lower() not in ('true', 'false', '1', '0'):
                raise ValueError(value)
            converted = value.lower() in ('true', '1')
        else:
            converted = kind(value)
    except ValueError:
        raise app.UsageError(f'--set: {field}={value!r} is not a valid {kind.__name__}.') from None
    node[leaf] = converted


def device_description() -> str:
    import jax

    devices = jax.devices()
    return f'{len(devices)}x {devices[0].platform}:{devices[0].device_kind}'


def run_one(spec: RunSpec, suite: Suite, workdir: str, data_dir: str | None) -> bool:
    """Trains one run unless finished; returns True if it trained (False: skipped)."""
    run_dir = os.path.join(workdir, spec.task, spec.name)
    if os.path.exists(os.path.join(run_dir, 'summary.json')):
        return False
    from fedjax_med import train  # heavy; not needed when every run is finished

    config = make_config(spec, suite, data_dir, workdir)
    t0 = time.time()
    print(f'=== {spec.task}/{spec.name}', flush=True)
    train.run(config, run_dir)
    with open(os.path.join(run_dir, 'run_info.json'), 'w') as f:
        json.dump({'device': device_description(), 'launcher_wall_s': time.time() - t0}, f)
    return True


# -------------------------------------------------------------------------------------------------
# Results
# -------------------------------------------------------------------------------------------------

COLUMNS = (
    'task',
    'mode',
    'algorithm',
    'prox_mu',
    'dp_target_epsilon',
    'achieved_epsilon',
    'partition',
    'alpha',
    'seed',
    'num_hospitals',
    'rounds',
    'main_metric',
    'final_metric',
    'best_metric',
    'centralized_reference',
    'rounds_to_95pct_centralized',
    'bytes_per_hospital',
    'wall_time_s',
    'device',
    'run_dir',
    'secondary_1',
    'secondary_2',
)
# Per task, the two metrics a reader puts next to the paper's besides the main one (results.csv's
# secondary_1 / secondary_2, last evaluation): chest X-ray accuracies at thresholds chosen on a
# validation half of the test split, BraTS per-case Dice and HD95 as the challenge computes them.
SECONDARY = {
    'chestxray14': ('normal_vs_abnormal_accuracy', 'accuracy_at_val_threshold'),
    'brats': ('mean_case_dice', 'mean_hd95'),
}


def _centralized_key(run: report.Run, dp_target: float) -> tuple:
    return run.task, run.partition, run.alpha, run.seed, dp_target


def rounds_to_reach(run: report.Run, threshold: float) -> int | None:
    rounds, values = run.series(f'eval/{run.main_metric}')
    hits = [int(r) for r, v in zip(rounds, values, strict=True) if v >= threshold]
    return hits[0] if hits else None


def algorithm_label(run: report.Run) -> str:
    """The run's algorithm, told apart when it trained on the public set alone
    ('public-pretrain') or started from such a model ('fedavg+warm')."""
    if run.config['data'].get('train_on', 'hospitals') == 'public':
        return 'public-pretrain'
    return run.algorithm + ('+warm' if run.config.get('init_from') else '')


def result_rows(runs: Sequence[report.Run]) -> list[dict]:
    """One results.csv row per run (see the module docstring for the columns)."""
    central = {
        _centralized_key(r, r.dp_target): r.final_metric
        for r in runs
        if algorithm_label(r) == 'centralized' and r.finished
    }
    rows = []
    for r in runs:
        ref = central.get(
            _centralized_key(r, r.dp_target), central.get(_centralized_key(r, 0.0), math.nan)
        )
        reached = rounds_to_reach(r, 0.95 * ref) if math.isfinite(ref) else None
        rows.append(
            {
                'task': r.task,
                'mode': r.config['mode'],
                'algorithm': algorithm_label(r),
                'prox_mu': r.config['local']['prox_mu'],
                'dp_target_epsilon': r.dp_target,
                'achieved_epsilon': r.epsilon,
                'partition': r.partition,
                'alpha': '' if r.alpha is None else r.alpha,
                'seed': r.seed,
                'num_hospitals': r.config['data']['num_clients'],
                'rounds': len(r.rows),
                'main_metric': r.main_metric,
                'final_metric': r.final_metric,
                'best_metric': r.best_metric,
                'centralized_reference': ref,
                'rounds_to_95pct_centralized': '' if reached is None else reached,
                'bytes_per_hospital': r.total_bytes_per_hospital,
                'wall_time_s': r.wall_time_s,
                'device': r.info.get('device', ''),
                'run_dir': os.path.relpath(r.path, os.path.dirname(os.path.dirname(r.path))),
                **{
                    f'secondary_{i + 1}': r.final(f'eval/{key}')
                    for i, key in enumerate(SECONDARY.get(r.task, ()))
                },
            }
        )
    return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: '' if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            )


def _mean_std(values: Sequence[float], digits: int) -> str:
    values = [float(v) for v in values if v != '' and math.isfinite(float(v))]
    if not values:
        return '–'
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f'{mean:.{digits}f}'
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f'{mean:.{digits}f} ± {std:.{digits}f}'


PAPER = (
    'Paper figures for comparison: chest X-ray accuracy 88.2% federated vs 90.1% '
    'centralised; BraTS Dice 0.78 vs 0.81; ε < 4.5; convergence within 50 rounds; '
    '< 250 MB communicated per hospital.'
)


def write_markdown(rows: Sequence[dict], path: str) -> None:
    """Mean ± std (sample std over seeds) of each setting, one table per task."""
    lines = [
        '# Results',
        '',
        PAPER,
        '',
        'Mean ± std over seeds (n = number of seeds). "95% of central." is the first '
        'evaluated round reaching 95% of the final metric of the centralised run with the '
        'same partition, seed and DP target (mean over the seeds that reach it; k/n reached).',
        '',
    ]
    for task in sorted({r['task'] for r in rows}):
        task_rows = [r for r in rows if r['task'] == task]
        metric = task_rows[0]['main_metric']
        second = ''.join(f' {name} |' for name in SECONDARY.get(task, ()))
        lines += [
            f'## {task} ({metric})',
            '',
            f'| algorithm | DP target ε | partition | n | final {metric} | best {metric} '
            f'|{second} achieved ε | 95% of central. (rounds) | MB / hospital | train s |',
            '|---|---|---|---|---|---|'
            + '---|' * len(SECONDARY.get(task, ()))
            + '---|---|---|---|',
        ]
        groups: dict[tuple, list[dict]] = {}
        for r in task_rows:
            key = (r['algorithm'], r['dp_target_epsilon'], r['partition'], str(r['alpha']))
            groups.setdefault(key, []).append(r)
        for (algorithm, eps, partition, alpha), group in sorted(groups.items()):
            reached = [
                g['rounds_to_95pct_centralized']
                for g in group
                if g['rounds_to_95pct_centralized'] != ''
            ]
            part = f'{partition} α={alpha}' if alpha else partition
            lines.append(
                f'| {algorithm} | {eps:g} | {part} | {len(group)} | '
                f'{_mean_std([g["final_metric"] for g in group], 4)} | '
                f'{_mean_std([g["best_metric"] for g in group], 4)} | '
                + ''.join(
                    f'{_mean_std([g[f"secondary_{i + 1}"] for g in group], 4)} | '
                    for i in range(len(SECONDARY.get(task, ())))
                )
                + f'{_mean_std([g["achieved_epsilon"] for g in group], 2) if eps else "–"} | '
                f'{_mean_std(reached, 1)} ({len(reached)}/{len(group)}) | '
                f'{_mean_std([g["bytes_per_hospital"] / 1e6 for g in group], 3)} | '
                f'{_mean_std([g["wall_time_s"] for g in group], 1)} |'
            )
        lines.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def collect(workdir: str) -> list[dict]:
    """Reads every run under workdir and writes results.csv and results.md."""
    runs = report.find_runs([workdir])
    rows = result_rows(runs)
    write_csv(rows, os.path.join(workdir, 'results.csv'))
    write_markdown(rows, os.path.join(workdir, 'results.md'))
    return rows


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------


def _enable_compilation_cache(workdir: str) -> None:
    if os.environ.get('JAX_COMPILATION_CACHE_DIR') or _JAX_CACHE.value == '':
        return
    import jax

    jax.config.update(
        'jax_compilation_cache_dir', _JAX_CACHE.value or os.path.join(workdir, '.jax_cache')
    )
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def suite_from_flags() -> Suite:
    """The --suite grid narrowed (or changed) by the other flags."""
    suite = SUITES[_SUITE.value]
    changes = {
        'tasks': tuple(_TASKS.value or suite.tasks),
        'seeds': _SEEDS.value or suite.seeds,
        'num_rounds': _NUM_ROUNDS.value or suite.num_rounds,
    }
    if _ALGORITHMS.value:
        changes['algorithms'] = tuple(_ALGORITHMS.value)
    if _PARTITIONS.value:
        known = {partition_name(*p): p for p in SUITES['paper'].partitions + suite.partitions}
        missing = [p for p in _PARTITIONS.value if p not in known]
        if missing:
            raise app.UsageError(f'--partitions: unknown {missing}; use {sorted(known)}.')
        changes['partitions'] = tuple(known[p] for p in _PARTITIONS.value)
    if _DP_EPSILONS.value is not None:
        changes['dp_epsilons'] = tuple(float(e) for e in _DP_EPSILONS.value if e)
    if _DP_ALGORITHMS.value is not None:
        changes['dp_algorithms'] = tuple(_DP_ALGORITHMS.value)
    overrides = []
    for item in _SET.value:
        field, sep, value = item.partition('=')
        if not sep:
            raise app.UsageError(f'--set: {item!r} is not FIELD=VALUE.')
        overrides.append((field.strip(), value.strip()))
    changes['overrides'] = tuple(overrides)
    for task in changes['tasks']:  # a bad override is an error now, not after hours of runs
        if task in CONFIG_MODULES:
            config = CONFIG_MODULES[task].get_config(suite.variant)
            for field, value in overrides:
                apply_override(config, field, value)
    suite = dataclasses.replace(suite, **changes)
    for field, known in (
        ('tasks', CONFIG_MODULES),
        ('algorithms', ALGORITHMS),
        ('dp_algorithms', ALGORITHMS),
    ):
        unknown = set(getattr(suite, field)) - set(known)
        if unknown:
            raise app.UsageError(f'--{field}: unknown {sorted(unknown)}; use {sorted(known)}.')
    return suite


def run_suite(
    suite: Suite, workdir: str, data_dir: str | None = None, *, write_report: bool = True
) -> list[dict]:
    """Runs (or resumes, or skips) every run of the grid; writes the results; returns the rows."""
    os.makedirs(workdir, exist_ok=True)
    from fedjax_med.data import sources

    sources.keep_last_dataset(True)  # runs of one seed share their data: build it once
    trained, skipped, failed = 0, 0, []
    for spec in grid(suite):
        try:
            if run_one(spec, suite, workdir, data_dir):
                trained += 1
            else:
                skipped += 1
        except Exception as e:  # one failed run must not lose the rest of the grid
            if type(e).__name__ == 'WorkdirError':  # e.g. another grid process trains it now
                print(f'skipped {spec.task}/{spec.name}: {e}', flush=True)
            else:
                traceback.print_exc()
            failed.append(f'{spec.task}/{spec.name}')
    print(
        f'{trained} run(s) trained, {skipped} already finished (skipped), {len(failed)} failed.',
        flush=True,
    )
    rows = collect(workdir)
    print(f'Wrote {len(rows)} rows to {os.path.join(workdir, "results.csv")} and results.md')
    if write_report:
        report.make_report([workdir], workdir)
        print(f'Report: {os.path.join(workdir, "index.html")}')
    if failed:
        raise SystemExit(f'{len(failed)} run(s) failed: {", ".join(failed)}; rerun to retry.')
    return rows


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not _WORKDIR.value:
        raise app.UsageError('--workdir is required.')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.ERROR)  # Orbax and dp-accounting are chatty at INFO/WARNING
    suite = suite_from_flags()
    workdir = os.path.expanduser(_WORKDIR.value)
    data_dir = os.path.expanduser(_DATA_DIR.value) if _DATA_DIR.value else None
    if _DRY_RUN.value:
        print('\n'.join(f'{s.task}/{s.name}' for s in grid(suite)))
        return
    os.makedirs(workdir, exist_ok=True)
    _enable_compilation_cache(workdir)
    run_suite(suite, workdir, data_dir, write_report=_REPORT.value)


if __name__ == '__main__':
    app.run(main)
