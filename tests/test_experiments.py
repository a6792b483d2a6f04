"""launch/experiments.py: a slice of the smoke grid end to end, then a rerun that skips it all."""

import csv
import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, 'launch', 'experiments.py')
# A slice of --suite=smoke (the whole smoke grid is 12 runs, ~1.5 min warm): centralised and
# FedAvg, without DP and at epsilon 4.5, IID, so every results column is exercised.
ARGS = ['--suite=smoke', '--algorithms=centralized,fedavg', '--partitions=iid', '--noreport']


def _launch(workdir, *extra):
    result = subprocess.run(
        [sys.executable, SCRIPT, f'--workdir={workdir}', *ARGS, *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_dry_run_lists_the_smoke_grid():
    result = subprocess.run(
        [sys.executable, SCRIPT, '--workdir=unused', '--suite=smoke', '--dry_run'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    runs = result.stdout.split()
    assert len(runs) == 12, result.stdout + result.stderr
    assert 'brats/fedprox-nodp-dirichlet0.1-seed0' in runs
    assert 'brats/centralized-eps4.5-iid-seed0' in runs
    assert not any('local-eps' in r or 'fedprox-eps' in r for r in runs)  # DP: central + FedAvg


def test_smoke_suite_writes_results_and_resumes(tmp_path):
    out = _launch(tmp_path)
    assert '4 run(s) trained' in out
    with open(tmp_path / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for column in (
        'task',
        'mode',
        'algorithm',
        'dp_target_epsilon',
        'achieved_epsilon',
        'partition',
        'alpha',
        'seed',
        'final_metric',
        'best_metric',
        'rounds_to_95pct_centralized',
        'bytes_per_hospital',
        'wall_time_s',
        'device',
    ):
        assert column in rows[0]
    by_name = {(r['algorithm'], float(r['dp_target_epsilon'])): r for r in rows}
    assert set(by_name) == {
        ('centralized', 0.0),
        ('centralized', 4.5),
        ('fedavg', 0.0),
        ('fedavg', 4.5),
    }
    for row in rows:
        assert 0.0 <= float(row['final_metric']) <= 1.0
        assert row['device']
    # A centralised run reaches 95% of its own final metric (at the last round at the latest).
    assert by_name['centralized', 0.0]['rounds_to_95pct_centralized'] in ('1', '2')
    assert 0 < float(by_name['fedavg', 4.5]['achieved_epsilon']) <= 4.5 + 1e-6
    assert by_name['fedavg', 0.0]['achieved_epsilon'] == ''
    assert float(by_name['fedavg', 0.0]['bytes_per_hospital']) > 0
    assert float(by_name['centralized', 0.0]['bytes_per_hospital']) == 0
    assert (tmp_path / 'results.md').read_text().count('| centralized |') == 2

    summary = tmp_path / 'brats' / 'fedavg-nodp-iid-seed0' / 'summary.json'
    mtime = summary.stat().st_mtime
    out = _launch(tmp_path)
    assert '0 run(s) trained, 4 already finished (skipped)' in out
    assert summary.stat().st_mtime == mtime


def test_dp_algorithms_and_config_overrides_narrow_the_grid():
    def dry(*extra):
        return subprocess.run(
            [sys.executable, SCRIPT, '--workdir=unused', '--suite=smoke', '--dry_run', *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    result = dry('--dp_algorithms=fedavg', '--set=data.num_train=64,local.epochs=2')
    runs = result.stdout.split()
    assert len(runs) == 10, result.stdout + result.stderr
    assert 'brats/fedavg-eps4.5-iid-seed0' in runs
    assert not any('centralized-eps' in r for r in runs)
    bad = dry('--set=data.num_trains=64')
    assert bad.returncode != 0 and "unknown config field 'data.num_trains'" in bad.stderr
    bad = dry('--set=local.epochs=two')
    assert bad.returncode != 0 and "local.epochs='two' is not a valid float" in bad.stderr
    # An optional field that is unset by default (a placeholder holding None) takes its type.
    assert dry('--set=dp.fast_clipping=false').returncode == 0
    bad = dry('--set=dp.fast_clipping=maybe')
    assert bad.returncode != 0 and "dp.fast_clipping='maybe' is not a valid bool" in bad.stderr


def test_hospital_scale_suite_order_and_configs():
    """--suite=nih_scale: per seed the public pretraining first, then centralised, FedAvg, its DP
    runs from the largest epsilon (warm start before cold), then the other baselines; warm runs
    start from their seed's pretraining run and DP runs use the large-batch DP variant. (In a
    child process: launch/experiments.py defines absl flags that other modules also define.)"""
    code = """if True:
        import json, sys
        sys.path.insert(0, 'launch')
        import experiments
        suite = experiments.SUITES['nih_scale']
        specs = experiments.grid(suite)
        cfg = lambda i: experiments.make_config(specs[i], suite, None, '/grid')
        pick = lambda c: {'mode': c.mode, 'train_on': c.data.train_on, 'init_from': c.init_from,
                          'dp': c.dp.mode, 'eps': c.dp.target_epsilon, 'batch': c.local.batch_size,
                          'sampling': c.local.sampling, 'public': c.data.public_fraction,
                          'epochs': c.local.epochs}
        print(json.dumps({'names': [s.name for s in specs],
                          'configs': [pick(cfg(i)) for i in range(5)]}))
    """
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out['names']) == 3 * 9
    assert out['names'][:9] == [
        'public-pretrain-seed0',
        'centralized-nodp-dirichlet0.5-seed0',
        'fedavg-nodp-dirichlet0.5-seed0',
        'fedavg-eps4.5-dirichlet0.5-warm-seed0',
        'fedavg-eps4.5-dirichlet0.5-seed0',
        'fedavg-eps2.5-dirichlet0.5-warm-seed0',
        'fedavg-eps2.5-dirichlet0.5-seed0',
        'local-nodp-dirichlet0.5-seed0',
        'fedprox-nodp-dirichlet0.5-seed0',
    ]
    pretrain, central, fedavg, warm, cold = out['configs']
    assert pretrain['train_on'] == 'public' and pretrain['mode'] == 'centralized'
    assert central['train_on'] == 'hospitals' and central['mode'] == 'centralized'
    assert warm['init_from'] == '/grid/chestxray14/public-pretrain-seed0'
    assert warm['dp'] == 'sample' and warm['eps'] == 4.5
    assert warm['batch'] == 1024 and warm['sampling'] == 'poisson'
    assert cold['init_from'] == '' and cold['batch'] == 1024
    assert fedavg['dp'] == 'none' and fedavg['batch'] == 64
    assert fedavg['public'] == warm['public'] == 0.1  # the same hospitals in every run
    assert central['epochs'] == 0.1 and fedavg['epochs'] == warm['epochs'] == 0.5
