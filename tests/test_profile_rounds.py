"""fedjax_med/profiling.py on hand-made events; launch/profile_rounds.py on a real trace."""

import os
import subprocess
import sys

import pytest

from fedjax_med import profiling
from tests.conftest import REPO


def span(name, ts, dur, tid=1, pid=7):
    return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'tid': tid, 'pid': pid}


EXECUTE = 'ThunkExecutor::Execute (wait for completion)'


def test_summary_splits_each_round_into_device_busy_and_idle_time():
    events = [
        span('PjitFunction(round_fn)', 0, 1),
        span('PjitFunction(round_fn)', 0.5, 0.4),  # nested span of the same call
        span(EXECUTE, 1, 60, tid=2),  # the round runs after dispatch returned
        span('PjitFunction(evaluate)', 62, 1),
        span(EXECUTE, 63, 5, tid=3),
        span('PjitFunction(round_fn)', 100, 1),
        span(EXECUTE, 101, 40, tid=2),
        span('host work', 141, 59),
        span('PjitFunction(round_fn)', 200, 1),
        span('ThreadpoolListener::Record', 150, 10, tid=2),  # bookkeeping, not execution
    ]
    rows = profiling.summarize(events)
    assert len(rows) == 3
    first, second = rows[0], rows[1]
    assert first['wall_ms'] == pytest.approx(0.100)
    assert first['device_busy_ms'] == pytest.approx(0.065)  # 60 (round) + 5 (evaluation)
    assert first['device_idle_ms'] == pytest.approx(0.035)
    assert first['busy'] == pytest.approx(0.65)
    assert first['programs'] == ['evaluate', 'round_fn']
    assert second['device_busy_ms'] == pytest.approx(0.040) and second['programs'] == ['round_fn']
    with pytest.raises(ValueError, match="No call of 'round_fn'"):
        profiling.summarize([span('PjitFunction(evaluate)', 0, 1)])


def test_device_processes_count_as_busy_on_accelerators():
    # GPU traces put kernels on the device's own process; the host thread only dispatches.
    events = [
        span('PjitFunction(round_fn)', 0, 1),
        span('fusion.3', 2, 50, pid=99),
        span('PjitFunction(round_fn)', 100, 1),
    ]
    assert profiling.summarize(events)[0]['device_busy_ms'] == pytest.approx(0.050)


def test_a_real_trace_of_smoke_rounds_is_summarised(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'launch', 'profile_rounds.py'),
            '--config=configs/brats.py:smoke',
            f'--workdir={tmp_path}',
            '--warmup_rounds=1',
            '--rounds=1',
            '--config.num_rounds=4',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith('| 1 |')]
    assert len(table) == 1, result.stdout
    cells = [c.strip() for c in table[0].strip('|').split('|')]
    wall_ms, busy_ms, idle_ms = float(cells[1]), float(cells[2]), float(cells[3])
    assert 0 < busy_ms <= wall_ms and idle_ms >= 0
    assert cells[5].startswith('round_fn, evaluate')  # smoke evaluates every round
