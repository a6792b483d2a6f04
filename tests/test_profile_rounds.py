"""fedjax_med/profiling.py on hand-made events; launch/profile_rounds.py on a real trace."""

import os
import subprocess
import sys

import pytest

from fedjax_med import profiling
from tests.conftest import REPO


def span(name, ts, dur, tid=1):
    return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'tid': tid}


def test_summary_splits_each_round_into_round_other_and_host_time():
    events = [
        span('PjitFunction(round_fn)', 0, 10),
        span('CommonPjRtLoadedExecutable::ExecuteHelperOnSingleDevice', 5, 60),  # async run
        span('PjitFunction(evaluate)', 80, 5),
        span('PjitFunction(round_fn)', 100, 10),
        span('PjitFunction(round_fn)', 100.5, 9),  # nested span of the same call
        span('PjitFunction(round_fn)', 150, 20),
        span('host work', 170, 30),
    ]
    rows = profiling.summarize(events)
    assert len(rows) == 3
    first = rows[0]
    assert first['round_exec_ms'] == pytest.approx(0.065)  # dispatch 0..10, execution to 65
    assert first['other_exec_ms'] == pytest.approx(0.005)
    assert first['host_only_ms'] == pytest.approx(0.030)  # 100 - 65 - 5
    assert first['busy'] == pytest.approx(0.70)
    assert first['other_programs'] == ['evaluate']
    assert rows[1]['wall_ms'] == pytest.approx(0.050) and rows[1]['other_programs'] == []
    with pytest.raises(ValueError, match="No call of 'round_fn'"):
        profiling.summarize([span('PjitFunction(evaluate)', 0, 1)])


def test_a_real_trace_of_smoke_rounds_is_summarised(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'launch', 'profile_rounds.py'),
         '--config=configs/brats.py:smoke', f'--workdir={tmp_path}', '--warmup_rounds=1',
         '--rounds=1', '--config.num_rounds=4'],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith('| 1 |')]
    assert len(table) == 1, result.stdout
    cells = [c.strip() for c in table[0].strip('|').split('|')]
    round_ms, wall_ms = float(cells[1]), float(cells[4])
    assert 0 < round_ms <= wall_ms
    assert 'evaluate' in cells[6]  # smoke evaluates every round
