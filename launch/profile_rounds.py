"""Profile real training rounds with `jax.profiler` and say where each round's time goes.

  python launch/profile_rounds.py --config=configs/brats.py:synthetic --workdir=/tmp/prof
  python launch/profile_rounds.py --config=configs/brats.py:smoke --workdir=/tmp/prof \
      --warmup_rounds=1 --rounds=1 --config.num_rounds=4

Runs `train.run` for `--warmup_rounds`, then resumes from that checkpoint for `--rounds` + 2 more
rounds inside `jax.profiler.trace(WORKDIR/trace)`, so the trace holds rounds exactly as
`python -m fedjax_med.main` runs them. The resumed process builds its round function again, so
the first traced round includes compilation (or a compilation-cache load) and is left out, as is
the last (its window would run on to the end of the trace). It then reads the Perfetto
trace (`*.trace.json.gz`; open it in https://ui.perfetto.dev or TensorBoard's profile plugin for
the full picture) and prints, per traced round:

  round exec   wall time of the jitted round function (dispatch to completion of its executable);
  other exec   the other device programs run between two rounds (evaluation, metric reductions);
  host only    time in which no device program ran: the host building the next round's index
               arrays, privacy accounting, logging, checkpointing; the device is idle then;
  busy         (round + other exec) / wall time between the starts of consecutive rounds.

The executable spans come from the PjRt client's execute events on the host thread that calls
jax (`PjitFunction(<name>)` brackets each call); on a CPU backend the device IS the host, so read
"host only" as "time not spent in XLA programs".
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `configs` is a top-level folder of the repository

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (with :variant).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; the trace goes to WORKDIR/trace.')
_WARMUP = flags.DEFINE_integer('warmup_rounds', 2, 'Rounds run (and compiled) before tracing.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds traced.')

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


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not _WORKDIR.value:
        raise app.UsageError('--workdir is required.')
    import jax

    from fedjax_med import train

    config = _CONFIG.value
    workdir = os.path.expanduser(_WORKDIR.value)
    needed = _WARMUP.value + _ROUNDS.value + 2
    if needed > config.num_rounds:
        raise app.UsageError(f'--warmup_rounds + --rounds + 2 = {needed} exceeds '
                             f'config.num_rounds={config.num_rounds}; lower them.')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO
    train.run(config, workdir, stop_after=_WARMUP.value)
    trace_dir = os.path.join(workdir, 'trace')
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python call events flood the trace buffer and cut it short
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=options):
        # + 2: the first round compiles (or loads from the cache), the last one's window would
        # run on to the end of the trace (final checkpoint, shutdown).
        train.run(config, workdir, stop_after=_ROUNDS.value + 2)
    rows = summarize(load_trace(trace_dir))[1:-1]
    print(format_rows(rows))
    print(f'Trace: {trace_dir} (Perfetto: *.trace.json.gz)')


if __name__ == '__main__':
    flags.mark_flag_as_required('config')
    app.run(main)
