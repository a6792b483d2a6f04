"""Command line: `python -m fedjax_med.main --config=configs/brats.py:synthetic --workdir=DIR`.

Any field can be overridden, e.g. `--config.num_rounds=5 --config.dp.mode=sample`. Rerunning the
same command on an existing workdir resumes from its latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_med import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints, config.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    app.run(main)
