"""Command line: `python -m fedjax_med.main --config=configs/brats.py:synthetic --workdir=DIR`.

Any field can be overridden, e.g. `--config.num_rounds=5 --config.dp.mode=sample`. Rerunning the
same command on an existing workdir resumes from its latest checkpoint.

Several hosts: run the same command on each with `--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT` (a shared --workdir; `launch/train_multi_gpu.sh` does this).
The hospitals are then sharded over every host's devices and process 0 writes the files.

A config that cannot run (`validate.py`: a bad value, incompatible options, an override of a field
that does not exist) stops before anything is loaded, with one line per problem naming the field,
the value and the fix, and exit status 2.
"""

import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_med import parallel, train, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints, config.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process runs: HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 1,
                                      'Multi-process runs: how many processes (one per host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Multi-process runs: this process, 0..N-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def _config_error(problems: list[str]) -> None:
    for problem in problems:
        print(f'fedjax_med: config error: {problem}', file=sys.stderr)
    sys.exit(2)


def _config_argument_problems(argv: list[str]) -> list[str]:
    """What is wrong with --config and its --config.* overrides in argv ([] if nothing is, or if
    the config cannot be loaded here: the original error then stands)."""
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    path, overrides = None, []
    for i, arg in enumerate(argv):
        if re.match(r'-{1,2}config(=|$)', arg):
            path = arg.split('=', 1)[1] if '=' in arg else (argv[i + 1] if i + 1 < len(argv)
                                                            else None)
        elif match := re.match(r'-{1,2}(no)?config\.([^=]+)', arg):
            overrides.append(match[2])
    if not path:
        return []
    if not os.path.isfile(path.split(':', 1)[0]):
        return [f'--config={path}: there is no file {path.split(":", 1)[0]!r}; give a config '
                'file and variant, e.g. --config=configs/brats.py:synthetic.']
    try:
        config = config_flags.config_flags.ConfigFileFlagParser('config').parse(path)
    except Exception:  # a broken config file: its own error stands
        return []
    if not isinstance(config, ml_collections.ConfigDict):
        return []
    found = (validate.unknown_field_problem(config, o) for o in overrides)
    return [problem for problem in found if problem]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config errors it reports as tracebacks (an override of a field
    the locked config lacks: AttributeError; a missing config file: OSError) as one line each."""
    try:
        args = app.parse_flags_with_usage(argv)
        _CONFIG.value.get('task')  # a config file that failed to load raises OSError here
        return args
    except (AttributeError, KeyError, OSError):
        problems = _config_argument_problems(argv)
        if not problems:
            raise
        _config_error(problems)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
        validate.validate(_CONFIG.value)  # again in train.run; here before any set-up
    except validate.ConfigError as e:
        _config_error(e.problems)
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
    app.run(main, flags_parser=_parse_flags)
