"""Reading a `jax.profiler` Perfetto trace of training rounds: where each round's time goes.

`summarize(load_trace(dir))` takes the time from one dispatch of the jitted round function to the
next and splits it into device-busy time (some device program running: the round, evaluation,
metric reductions) and device-idle time (the device waits for the host: index arrays, accounting,
logging, checkpoints). Used by launch/profile_rounds.py.

Dispatch is asynchronous, so a call's `PjitFunction(<name>)` span on the host thread ends long
before its program does; device activity comes from the executor's own events instead (see
`device_spans`). On a CPU backend the "device" is a pool of host threads.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Sequence

ROUND_FN = 'round_fn'  # the name `rounds.build_round_fn` jits


def load_trace(trace_dir: str) -> list[dict]:
    """Complete ('X') events of the newest Perfetto trace under trace_dir."""
    files = sorted(
        glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
        key=os.path.getmtime,
    )
    if not files:
        raise FileNotFoundError(f'No *.trace.json.gz under {trace_dir}; was the trace written?')
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data['traceEvents'] if isinstance(data, dict) else data
    return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def jit_calls(events: Sequence[dict]) -> list[tuple[str, float, float]]:
    """(function name, dispatch start us, dispatch end us) of every call of a jitted function, in
    time order (a nested span of the same call counts once)."""
    out = []
    for start, end, name in sorted(
        (e['ts'], e['ts'] + e['dur'], e['name'][len('PjitFunction(') : -1])
        for e in events
        if e['name'].startswith('PjitFunction(')
    ):
        if out and out[-1][0] == name and start <= out[-1][2]:
            continue
        out.append((name, start, end))
    return out


def device_spans(events: Sequence[dict]) -> list[tuple[float, float]]:
    """When a device program was running: on CPU the XLA thunk executor's runs (they happen on
    worker threads, after an asynchronous dispatch has returned); on GPU/TPU every event of a
    process other than the host's (the device streams)."""
    host_pids = {e.get('pid') for e in events if e['name'].startswith('PjitFunction(')}
    return [
        (e['ts'], e['ts'] + e['dur'])
        for e in events
        if e['name'].startswith('ThunkExecutor::Execute (wait')
        or (host_pids and e.get('pid') not in host_pids)
    ]


def _covered(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of spans clipped to [lo, hi]."""
    total, cursor = 0.0, lo
    for start, end in sorted(spans):
        start, end = max(start, cursor), min(end, hi)
        if end > start:
            total += end - start
            cursor = end
    return total


def summarize(events: Sequence[dict]) -> list[dict]:
    """Per traced round, from one dispatch of the round function to the next (or the trace end):
    wall time, time some device program ran (the round itself, evaluation, reductions), the rest
    (the device idle: host work such as index arrays, accounting, logging, checkpoints), in ms,
    and which jitted functions were dispatched in that window."""
    calls = jit_calls(events)
    starts = [s for n, s, _ in calls if n == ROUND_FN]
    if not starts:
        names = sorted({n for n, _, _ in calls})
        raise ValueError(f'No call of {ROUND_FN!r} in the trace (jitted calls seen: {names}).')
    busy_spans = device_spans(events)
    trace_end = max(e['ts'] + e['dur'] for e in events)
    rows = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else trace_end
        wall = end - start
        busy = _covered(busy_spans, start, end)
        rows.append(
            {
                'wall_ms': wall / 1e3,
                'device_busy_ms': busy / 1e3,
                'device_idle_ms': (wall - busy) / 1e3,
                'busy': busy / wall if wall else 1.0,
                'programs': sorted({n for n, s, _ in calls if start <= s < end}),
            }
        )
    return rows


def _names(programs: Sequence[str], keep: int = 4) -> str:
    """The round and evaluation first, then others, at most `keep` names and a count."""
    ordered = sorted(programs, key=lambda n: ({ROUND_FN: 0, 'evaluate': 1}.get(n, 2), n))
    more = len(ordered) - keep
    return ', '.join(ordered[:keep]) + (f' +{more} more' if more > 0 else '')


def format_rows(rows: Sequence[dict]) -> str:
    lines = [
        '| round | wall ms | device busy ms | device idle ms | busy | jitted calls |',
        '|---|---:|---:|---:|---:|---|',
    ]
    for i, r in enumerate(rows):
        lines.append(
            f'| {i + 1} | {r["wall_ms"]:.1f} | {r["device_busy_ms"]:.1f} | '
            f'{r["device_idle_ms"]:.1f} | {r["busy"]:.2f} | '
            f'{_names(r["programs"])} |'
        )
    return '\n'.join(lines)
