"""Multi-host training: two processes (one CPU device each, collectives through gloo) run the
same `fedjax_med.main` command as one run, and give exactly what one process over two devices
gives — also when the two-process run is interrupted and resumed from its checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

CONFIG = 'configs/chestxray14.py:smoke'
# Secure aggregation: the per-hospital SecAgg inputs and metrics are split over both processes.
# A constant learning rate, so that 2 rounds resumed to 3 are the first 3 of a 3-round run (a
# schedule over rounds depends on num_rounds).
FLAGS = [
    '--config.secagg.enabled=True',
    '--config.eval_every=1',
    '--config.local.schedule=constant',
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _env(num_devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    flags = [
        f
        for f in env.get('XLA_FLAGS', '').split()
        if not f.startswith('--xla_force_host_platform_device_count')
    ]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}'])
    return env


def _main(workdir, rounds: int, extra=()) -> list[str]:
    return [
        sys.executable,
        '-m',
        'fedjax_med.main',
        f'--config={CONFIG}',
        f'--workdir={workdir}',
        f'--config.num_rounds={rounds}',
        *FLAGS,
        *extra,
    ]


def _run_two_processes(workdir, rounds: int) -> list[str]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            _main(
                workdir,
                rounds,
                [
                    '--num_processes=2',
                    f'--process_id={i}',
                    f'--coordinator_address=localhost:{port}',
                ],
            ),
            cwd=REPO,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail('two-process run did not finish in 400 s')
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith('time/')} for line in f
        ]


def test_two_processes_equal_one_process_on_two_devices_and_resume(tmp_path):
    multi, single = tmp_path / 'multi', tmp_path / 'single'
    first = _run_two_processes(multi, rounds=2)
    assert 'on 2 device(s) in 2 processes' in first[0]
    assert 'round    2/3' not in first[0] and 'round' not in first[1]  # process 0 alone prints
    resumed = _run_two_processes(multi, rounds=3)
    assert 'Resumed from round 2' in resumed[0]

    done = subprocess.run(
        _main(single, 3),
        cwd=REPO,
        env=_env(2),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # (The model line: the closing summary names the workdir, whose path holds this test's name.)
    model_line = next(li for li in done.stdout.splitlines() if li.startswith('Model '))
    assert 'on 2 device(s)' in model_line and 'processes' not in model_line

    got, want = _rows(multi), _rows(single)
    assert [r['round'] for r in got] == [1, 2, 3]
    assert got == want  # every metric: training loss, evaluation, privacy, bytes
    summary = json.loads((multi / 'summary.json').read_text())
    assert summary['summary/num_devices'] == 2 and summary['round'] == 3
    assert sorted(os.listdir(multi)) == [
        'checkpoints',
        'config.json',
        'metrics.jsonl',
        'summary.json',
        'tensorboard',
    ]
    # Process 0 alone writes the event files (writers.create_default_writer), rewritten from the
    # checkpointed history on the resume: one file.
    assert len(os.listdir(multi / 'tensorboard')) == 1
