"""Profile real training rounds with `jax.profiler` and say where each round's time goes.

  python launch/profile_rounds.py --config=configs/brats.py:synthetic --workdir=/tmp/prof
  python launch/profile_rounds.py --config=configs/brats.py:smoke --workdir=/tmp/prof \
      --warmup_rounds=1 --rounds=1 --config.num_rounds=4

Runs `train.run` (so the rounds are exactly those `python -m fedjax_med.main` runs) with a hook
that starts a `jax.profiler` trace (WORKDIR/trace) once `--warmup_rounds` rounds are done
(compilation included) and stops it `--rounds` + 1 rounds later; the last traced round is left
out of the table (its window runs on to the end of the trace). It then reads the Perfetto
trace (`*.trace.json.gz`; open it in https://ui.perfetto.dev or TensorBoard's profile plugin for
the full picture) and prints, per traced round:

  round exec   wall time of the jitted round function (dispatch to completion of its executable);
  other exec   the other device programs run between two rounds (evaluation, metric reductions);
  host only    time in which no device program ran: the host building the next round's index
               arrays, privacy accounting, logging, checkpointing; the device is idle then;
  busy         (round + other exec) / wall time between the starts of consecutive rounds.

How the spans are read: `fedjax_med/profiling.py`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[:1] != [REPO]:  # first, ahead of any installed package named `configs`
    sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not installed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (with :variant).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; the trace goes to WORKDIR/trace.')
_WARMUP = flags.DEFINE_integer('warmup_rounds', 2, 'Rounds run (and compiled) before tracing.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds traced.')


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not _WORKDIR.value:
        raise app.UsageError('--workdir is required.')
    import jax

    from fedjax_med import profiling, train

    config = _CONFIG.value
    workdir = os.path.expanduser(_WORKDIR.value)
    if _WARMUP.value < 1 or _ROUNDS.value < 1:
        raise app.UsageError(
            '--warmup_rounds and --rounds must be at least 1 (the first round compiles).'
        )
    needed = _WARMUP.value + _ROUNDS.value + 1
    if needed > config.num_rounds:
        raise app.UsageError(
            f'--warmup_rounds + --rounds + 1 = {needed} exceeds '
            f'config.num_rounds={config.num_rounds}; lower them.'
        )
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO
    trace_dir = os.path.join(workdir, 'trace')
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python call events flood the trace buffer and cut it short
    first, last = _WARMUP.value, _WARMUP.value + _ROUNDS.value + 1

    def trace_rounds(done: int) -> None:
        if done == first:
            jax.profiler.start_trace(
                trace_dir, create_perfetto_trace=True, profiler_options=options
            )
        elif done == last:
            jax.profiler.stop_trace()

    train.run(config, workdir, stop_after=last, hooks=[trace_rounds])
    rows = profiling.summarize(profiling.load_trace(trace_dir))[:-1]
    print(profiling.format_rows(rows))
    print(f'Trace: {trace_dir} (Perfetto: *.trace.json.gz)')


if __name__ == '__main__':
    flags.mark_flag_as_required('config')
    app.run(main)
