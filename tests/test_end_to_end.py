"""Whole runs of the smoke configs: the CLI entry point, sharding over 8 fake devices, resuming
after SIGKILL, and the baselines (centralised, local) through the same code path."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fedjax_med.checkpoint import Checkpointer
from tests.conftest import REPO


def run_python(code: str, *, devices: int = 1, timeout: int = 300) -> str:
    env = dict(
        os.environ, PYTHONPATH=REPO, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
    )
    out = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def final_arrays(workdir):
    state, host = Checkpointer(os.path.join(workdir, 'checkpoints')).restore_arrays()
    return state, host


def read_metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def cli(config: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        '-m',
        'fedjax_med.main',
        f'--config={config}',
        f'--workdir={workdir}',
        *overrides,
    ]


@pytest.mark.parametrize('config', ['chestxray14', 'brats'])
def test_cli_smoke_run_without_tensorflow(tmp_path, config):
    workdir = str(tmp_path / config)
    out = run_python(f"""
        import runpy, sys
        sys.argv = ['fedjax_med.main', '--config=configs/{config}.py:smoke',
                    '--workdir={workdir}']
        try:
            runpy.run_module('fedjax_med.main', run_name='__main__')
        except SystemExit as e:
            assert not e.code, e.code
        assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
        print('NO_TF_OK')
    """)
    assert 'NO_TF_OK' in out
    assert 'round    3/3' in out
    rows = read_metrics(workdir)
    assert [r['round'] for r in rows] == [1, 2, 3]
    metric = 'eval/mean_auroc' if config == 'chestxray14' else 'eval/mean_dice'
    # The metrics beside the main one: thresholds chosen on a validation half (CXR), per-case
    # Dice and HD95 on the test cases' volumes (BraTS).
    extra = (
        (
            'eval/macro_f1_at_0.5',
            'eval/accuracy_at_val_threshold',
            'eval/macro_f1_at_val_threshold',
            'eval/normal_vs_abnormal_accuracy',
        )
        if config == 'chestxray14'
        else (
            'eval/mean_case_dice',
            'eval/case_dice_et',
            'eval/mean_hd95',
            'eval/hd95_wt',
            'eval/num_cases',
        )
    )
    for r in rows:
        for key in (
            'train/loss',
            metric,
            'privacy/epsilon',
            'comm/bytes_up',
            'comm/bytes_down',
            'time/round_s',
            *extra,
        ):
            assert key in r, key
        assert r['privacy/epsilon'] is None
        assert r['comm/bytes_up'] > 0 and r['comm/bytes_down'] == r['comm/bytes_up']
    assert rows[-1]['train/loss'] < rows[0]['train/loss']
    assert os.path.exists(os.path.join(workdir, 'config.json'))


def test_one_device_and_eight_devices_give_the_same_model(tmp_path):
    # 4 hospitals on 8 devices: the client axis is padded with inert hospitals and sharded.
    run_python(
        f"""
        from configs import chestxray14
        from fedjax_med import train
        for d in (1, 8):
            c = chestxray14.get_config('smoke')
            c.num_rounds = 2
            s = train.run(c, '{tmp_path}/dev%d' % d, num_devices=d)
            assert s['summary/num_devices'] == d and s['summary/round_traces'] == 1, s
    """,
        devices=8,
    )
    one, _ = final_arrays(str(tmp_path / 'dev1'))
    eight, _ = final_arrays(str(tmp_path / 'dev8'))
    import jax

    for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(eight['params']), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_every_mode_on_one_and_three_devices_gives_the_same_metrics(tmp_path):
    # Federated and centralised: the global test batches are split over the devices (2 batches
    # padded to 3); local: per-hospital models sharded over devices (3 hospitals on 3 devices),
    # evaluated on the global split and on each hospital's own; centralised: one client padded
    # to 3.
    run_python(
        f"""
        from configs import brats
        from fedjax_med import train
        for mode in ('federated', 'local', 'centralized'):
            for d in (1, 3):
                c = brats.get_config('smoke')
                c.mode, c.num_rounds = mode, 1
                train.run(c, '{tmp_path}/%s%d' % (mode, d), num_devices=d)
    """,
        devices=3,
    )
    for mode in ('federated', 'local', 'centralized'):
        one, three = read_metrics(tmp_path / f'{mode}1'), read_metrics(tmp_path / f'{mode}3')
        assert 'eval/mean_dice' in one[-1] and 'eval/own_mean_dice' in one[-1]
        for a, b in zip(one, three, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if not key.startswith('time/') and a[key] is not None:
                    np.testing.assert_allclose(
                        a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=f'{mode}: {key}'
                    )


def test_each_device_trains_only_its_own_hospitals():
    """On a mesh of 4 devices the compiled round moves no training data between devices: its
    only collectives are the all-reduces of aggregation (a `lax.map` left to XLA's partitioner
    gathered every hospital's data to every device). Hospitals one at a time, in chunks of two,
    and all vmapped."""
    out = run_python(
        r"""
        import importlib.util, re, sys
        spec = importlib.util.spec_from_file_location('bench', 'launch/benchmark.py')
        bench = importlib.util.module_from_spec(spec)
        sys.modules['bench'] = bench
        spec.loader.exec_module(bench)
        from fedjax_med import rounds
        w = bench.Workload('resnet_small', 'chestxray14', 8, 1, batch=2, steps=2, width=4,
                           depth=1, norm_groups=2)
        for n in (1, 2, 8):
            setup = bench.build_round_setup(bench.dataclasses.replace(w, clients_in_parallel=n),
                                            bench.RoundSpec(8, 2, num_devices=4))
            hlo = setup.round_fn.fn.lower(setup.state, setup.client_data, setup.inputs,
                                          rounds.round_key(0, 0)).compile().as_text()
            ops = sorted(set(re.findall(r'(all-gather|all-to-all|collective-permute|'
                                        r'reduce-scatter|all-reduce)(?:-start)?\(', hlo)))
            print(n, ops)
    """,
        devices=4,
    )
    assert out.split('\n')[:3] == ["1 ['all-reduce']", "2 ['all-reduce']", "8 ['all-reduce']"], out


def test_sigkill_after_round_two_then_rerun_equals_uninterrupted(tmp_path):
    overrides = ('--config.num_rounds=4',)
    straight = str(tmp_path / 'straight')
    subprocess.run(
        cli('configs/chestxray14.py:smoke', straight, *overrides),
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    killed = str(tmp_path / 'killed')
    proc = subprocess.Popen(
        cli('configs/chestxray14.py:smoke', killed, *overrides),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt2 = os.path.join(killed, 'checkpoints', '2')
    deadline = time.time() + 300
    while not os.path.isdir(ckpt2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(ckpt2), 'the run ended before its round-2 checkpoint'
    assert len(read_metrics(killed)) < 4
    out = subprocess.run(
        cli('configs/chestxray14.py:smoke', killed, *overrides),
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert 'Resumed from round' in out.stdout
    a, _ = final_arrays(straight)
    b, _ = final_arrays(killed)
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    ra, rb = read_metrics(straight), read_metrics(killed)
    assert [r['round'] for r in rb] == [1, 2, 3, 4]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith('time/')} for r in rows]
    assert strip(ra) == strip(rb)


def test_resume_with_a_changed_config_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / 'w')
    subprocess.run(
        cli('configs/chestxray14.py:smoke', workdir, '--config.num_rounds=1'),
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    with open(os.path.join(workdir, 'config.json')) as f:
        config_json = f.read()
    out = subprocess.run(
        cli(
            'configs/chestxray14.py:smoke',
            workdir,
            '--config.num_rounds=2',
            '--config.local.learning_rate=0.1',
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert 'local.learning_rate: checkpoint has 0.003, config has 0.1' in out.stderr
    with open(os.path.join(workdir, 'config.json')) as f:
        assert f.read() == config_json  # the refused rerun left the run's config as it was


@pytest.mark.parametrize('mode', ['centralized', 'local'])
def test_baselines_run_through_the_same_round(tmp_path, mode):
    out = run_python(f"""
        from configs import brats
        from fedjax_med import train
        c = brats.get_config('smoke')
        c.mode = '{mode}'
        c.num_rounds = 2
        s = train.run(c, '{tmp_path}/{mode}')
        print('RESULT', s['eval/mean_dice'], s['eval/own_mean_dice'], s['comm/bytes_up'],
              s['summary/num_training_clients'])
    """)
    line = next(li for li in out.splitlines() if li.startswith('RESULT'))
    dice, own, bytes_up, clients = line.split()[1:]
    assert 0 <= float(dice) <= 1 and 0 <= float(own) <= 1
    assert int(float(bytes_up)) == 0  # nothing is communicated without a federation
    assert int(clients) == (1 if mode == 'centralized' else 3)
    # summary.json is strict JSON: a NaN (here the update norm, which local training has none
    # of) is written as null, as in metrics.jsonl.
    text = open(os.path.join(tmp_path, mode, 'summary.json')).read()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in summary.json'))
    if mode == 'local':
        assert summary['train/update_norm'] is None


def test_a_checkpoint_that_predates_a_field_resumes_only_with_its_old_behaviour():
    from fedjax_med.checkpoint import config_differences

    current = {
        'data': {'name': 'synthetic_brats', 'patch_size': 0, 'synthetic_signal': 2.5},
        'dp': {'fast_clipping': False},
    }
    saved = {'data': {'name': 'synthetic_brats'}, 'dp': {}}
    # patch_size 0 and fast_clipping False are what the old run did; the old CXR twin had the
    # findings' signal at 1, so asking for 2.5 is a different run.
    assert config_differences(saved, current) == [
        'data.synthetic_signal: checkpoint has 1.0, config has 2.5'
    ]
    current['data']['patch_size'] = 64
    assert 'data.patch_size: checkpoint has 0, config has 64' in config_differences(saved, current)
    # BraTS runs from before the leaky-ReLU U-Net resume only with plain ReLUs.
    saved['model'], current['model'] = {}, {'negative_slope': 0.1}
    assert 'model.negative_slope: checkpoint has 0.0, config has 0.1' in config_differences(
        saved, current
    )
    current['model']['negative_slope'] = 0.0
    assert not any(d.startswith('model.') for d in config_differences(saved, current))
    # Runs from before per-hospital noise calibration: a calibrated DP-SGD run resumes only with
    # one shared sigma; a run without calibrated DP-SGD resumes whatever the field says.
    current['dp']['noise_per_hospital'] = True
    assert not any(d.startswith('dp.') for d in config_differences(saved, current))
    for run in (saved, current):
        run['dp'].update(mode='sample', target_epsilon=3.0)
    assert [d for d in config_differences(saved, current) if d.startswith('dp.')] == [
        'dp.noise_per_hospital: checkpoint has False, config has True'
    ]
    # The data options added to the config later read as the defaults the readers used.
    old_data = {'name': 'brats2021'}
    new_data = {
        'name': 'brats2021',
        'max_cases': 0,
        'brain_slices_only': True,
        'empty_slice_stride': 1,
        'synthetic_via_tfds': False,
    }
    assert config_differences({'data': old_data}, {'data': new_data}) == []
    assert config_differences({'data': old_data}, {'data': dict(new_data, max_cases=5)}) == [
        'data.max_cases: checkpoint has 0, config has 5'
    ]
    # Without DP, a leftover target or multiplier (now refused by validation) draws no noise:
    # clearing it must not block the resume; with DP it is a different run.
    leftover = {'dp': {'mode': 'none', 'target_epsilon': 4.0, 'noise_multiplier': 1.0}}
    cleared = {'dp': {'mode': 'none', 'target_epsilon': 0.0, 'noise_multiplier': 0.0}}
    assert config_differences(leftover, cleared) == []
    noisy = {'dp': {'mode': 'sample', 'target_epsilon': 0.0, 'noise_multiplier': 1.0}}
    assert config_differences(noisy, dict(noisy, dp=dict(noisy['dp'], noise_multiplier=2.0)))


def test_num_rounds_may_change_on_resume_only_when_no_noise_is_calibrated_from_it():
    from fedjax_med.checkpoint import config_differences

    for mode in ('sample', 'client'):
        saved = {'num_rounds': 2, 'dp': {'mode': mode, 'target_epsilon': 3.0}}
        current = {'num_rounds': 5, 'dp': {'mode': mode, 'target_epsilon': 3.0}}
        (diff,) = config_differences(saved, current)
        assert diff.startswith(
            'num_rounds: checkpoint has 2, config has 5. The DP noise is '
            'calibrated to num_rounds (config.dp.target_epsilon=3.0)'
        )
        assert diff.endswith('Keep --config.num_rounds=2, or start a new --workdir.')
        assert config_differences(saved, dict(current, num_rounds=2)) == []
    # Noise as given (dp.noise_multiplier), or no DP: the rounds already run do not depend on it.
    for dp in (
        {'mode': 'sample', 'target_epsilon': 0.0, 'noise_multiplier': 1.0},
        {'mode': 'none', 'target_epsilon': 0.0},
        {'mode': 'none', 'target_epsilon': 3.0},
    ):
        assert config_differences({'num_rounds': 2, 'dp': dp}, {'num_rounds': 5, 'dp': dp}) == []


def test_resume_on_another_device_count_with_per_hospital_state(tmp_path):
    # Top-k residuals are per hospital, on a client axis padded to a multiple of the device
    # count: 4 hospitals are 4 rows on 1 device and 6 on 3. Stopped on 1 device and resumed on
    # 3, the run must end where an uninterrupted 1-device run ends (up to float rounding of the
    # sharded round).
    out = run_python(
        f"""
        import numpy as np, jax
        from configs import chestxray14
        from fedjax_med import train
        from fedjax_med.checkpoint import Checkpointer

        def config():
            c = chestxray14.get_config('smoke')
            c.num_rounds, c.eval_every = 2, 100
            c.compression.kind, c.compression.topk_fraction = 'topk', 0.1
            return c

        train.run(config(), '{tmp_path}/split', num_devices=1, stop_after=1)
        train.run(config(), '{tmp_path}/split', num_devices=3)
        train.run(config(), '{tmp_path}/whole', num_devices=1)
        a, _ = Checkpointer('{tmp_path}/split/checkpoints').restore_arrays()
        b, _ = Checkpointer('{tmp_path}/whole/checkpoints').restore_arrays()
        assert a['client_state'] and jax.tree.leaves(a['client_state'])[0].shape[0] == 6
        for key in ('params', 'client_state'):
            for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True):
                np.testing.assert_allclose(x[:4] if key == 'client_state' else x,
                                           y[:4] if key == 'client_state' else y, atol=1e-5)
        print('OK')
    """,
        devices=3,
    )
    assert 'OK' in out
