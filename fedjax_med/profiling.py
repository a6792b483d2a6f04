"""Reading a `jax.profiler` Perfetto trace of training rounds: where each round's time goes.

`summarize(load_trace(dir))` splits the time from one call of the jitted round function to the
next into the round program, other device programs (evaluation, metric reductions) and host-only
time (no device program running: the device is idle). Used by launch/profile_rounds.py.

The executable spans come from the PjRt client's events on the host thread that calls jax
(`PjitFunction(<name>)` brackets each call; execute events started inside it extend it when
execution outlives dispatch); on a CPU backend the device IS the host, so read "host only" as
"time not spent in XLA programs".
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
    files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f'No *.trace.json.gz under {trace_dir}; was the trace written?')
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data['traceEvents'] if isinstance(data, dict) else data
    return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


def jit_calls(events: Sequence[dict]) -> list[tuple[str, float, float]]:
    """(function name, start us, end us) of every call of a jitted function, in time order.

    A call is the `PjitFunction(name)` span plus, when execution outlives dispatch (asynchronous
    backends), the executable run it started, up to the end of the last execute event that began
    inside the dispatch span."""
    calls = sorted((e['ts'], e['ts'] + e['dur'], e['name'][len('PjitFunction('):-1])
                   for e in events if e['name'].startswith('PjitFunction('))
    runs = sorted((e['ts'], e['ts'] + e['dur']) for e in events
                  if e['name'].startswith(('ThunkExecutor::Execute', 'ExecuteHelper',
                                           'CommonPjRtLoadedExecutable::Execute')))
    out = []
    for start, end, name in calls:
        if out and out[-1][0] == name and start <= out[-1][2]:
            continue  # a nested span of the same call
        last = max((r_end for r_start, r_end in runs if start <= r_start <= end), default=end)
        out.append((name, start, max(end, last)))
    return out


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
    """Per traced round (from one round's start to the next round's start, or the trace end):
    round / other executable time, host-only time and the busy fraction, in milliseconds."""
    calls = jit_calls(events)
    starts = [(s, e) for n, s, e in calls if n == ROUND_FN]
    if not starts:
        names = sorted({n for n, _, _ in calls})
        raise ValueError(f'No call of {ROUND_FN!r} in the trace (jitted calls seen: {names}).')
    trace_end = max(e['ts'] + e['dur'] for e in events)
    rows = []
    for i, (start, end) in enumerate(starts):
        window_end = starts[i + 1][0] if i + 1 < len(starts) else trace_end
        others = [(s, e) for n, s, e in calls if n != ROUND_FN and start <= s < window_end]
        wall = window_end - start
        other = _covered(others, start, window_end)
        round_exec = end - start
        rows.append({'round_exec_ms': round_exec / 1e3, 'other_exec_ms': other / 1e3,
                     'host_only_ms': max(wall - round_exec - other, 0.0) / 1e3,
                     'wall_ms': wall / 1e3, 'busy': (round_exec + other) / wall if wall else 1.0,
                     'other_programs': sorted({n for n, s, _ in calls
                                               if n != ROUND_FN and start <= s < window_end})})
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = ['| round | round exec ms | other exec ms | host only ms | wall ms | busy | other '
             'programs |', '|---|---:|---:|---:|---:|---:|---|']
    for i, r in enumerate(rows):
        lines.append(f'| {i + 1} | {r["round_exec_ms"]:.1f} | {r["other_exec_ms"]:.1f} | '
                     f'{r["host_only_ms"]:.1f} | {r["wall_ms"]:.1f} | {r["busy"]:.2f} | '
                     f'{", ".join(r["other_programs"]) or "–"} |')
    return '\n'.join(lines)
