"""Command line: `python -m fedjax_med.main --config=configs/brats.py:synthetic --workdir=DIR`.

Any field can be overridden, e.g. `--config.num_rounds=5 --config.dp.mode=sample`. Rerunning the
same command on an existing workdir resumes from its latest checkpoint.

Several hosts: run the same command on each with `--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT` (a shared --workdir; `launch/train_multi_gpu.sh` does this).
The hospitals are then sharded over every host's devices and process 0 writes the files.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_med import parallel, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints, config.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process runs: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1,
                                      'Multi-process runs: how many processes (one per host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Multi-process runs: this process, 0..N-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if _NUM_PROCESSES.value > 1:
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value or not _COORDINATOR.value:
            raise app.UsageError(
                f'--num_processes={_NUM_PROCESSES.value} needs --coordinator_address=HOST:PORT '
                f'and --process_id in 0..{_NUM_PROCESSES.value - 1} '
                f'(got {_COORDINATOR.value!r}, {_PROCESS_ID.value}).')
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
