"""Command line: `python -m fedjax_med.main --config=configs/brats.py:synthetic --workdir=DIR`.

Any field can be overridden, e.g. `--config.num_rounds=5 --config.dp.mode=sample`. Rerunning the
same command on an existing workdir resumes from its latest checkpoint.

Several hosts: run the same command on each with `--num_processes=N --process_id=i
--coordinator_address=HOST0:PORT` (a shared --workdir; `launch/train_multi_gpu.sh` does this).
The hospitals are then sharded over every host's devices and process 0 writes the files.

A config that cannot run (`validate.py`: a bad value, incompatible options, an override of a field
that does not exist, a value of the wrong type, a misspelt variant, a real dataset that is not
built) stops before anything is loaded, with one line per problem naming the field, the value and
the fix, and exit status 2; so does a workdir that is in use by another run, holds another run's
checkpoint, or holds a previous run's outputs without a checkpoint (`--overwrite` starts over).
A round that goes non-finite stops the run with one line and exit status 1. SIGINT / SIGTERM
stop at the end of the round in progress with it checkpointed (a second one at once): one line,
exit status 130 / 143.
"""

import os
import re
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# fedjax_med's own modules (JAX, ~3 s to import) are imported in the functions that need them,
# so that a Ctrl-C while they load stops quietly too (see the end of this file).

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file (path[:variant]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints, config.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: HOST:PORT of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', 1, 'Multi-process runs: how many processes (one per host).'
)
_PROCESS_ID = flags.DEFINE_integer('process_id', 0, 'Multi-process runs: this process, 0..N-1.')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite',
    False,
    'Start over in a --workdir that holds a previous run: delete its '
    'checkpoints/, metrics.jsonl, summary.json and config.json first (without it such a workdir '
    'is resumed, or refused when it cannot be).',
)
_CACHE = flags.DEFINE_string(
    'compilation_cache',
    None,
    "Folder of JAX's persistent compilation cache, so a rerun or "
    "resume loads its programs instead of compiling them ('' turns it off; default "
    '$FEDJAX_MED_COMPILATION_CACHE or ~/.cache/fedjax_med/jax; JAX_COMPILATION_CACHE_DIR wins).',
)
flags.mark_flags_as_required(['config', 'workdir'])

HELP_FLAGS = ('-?', '-h', '-help', '--help', '--helpshort', '--helpfull', '--helpxml')
TYPE_NAMES = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def _error(kind: str, problems: list[str], status: int = 2) -> None:
    for problem in problems:
        print(f'fedjax_med: {kind}: {problem}', file=sys.stderr, flush=True)
    sys.exit(status)


def _config_error(problems: list[str]) -> None:
    _error('config error', problems)


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if re.match(r'-{1,2}config(=|$)', arg):
            return (
                arg.split('=', 1)[1] if '=' in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            )
    return None


def _load_config(path: str | None) -> ml_collections.ConfigDict | None:
    """The config --config=path names, without its overrides (None if it cannot be loaded)."""
    if not path or not os.path.isfile(path.split(':', 1)[0]):
        return None
    try:
        config = config_flags.config_flags.ConfigFileFlagParser('config').parse(path)
    except Exception:  # a broken config file: its own error stands
        return None
    return config if isinstance(config, ml_collections.ConfigDict) else None


def _flag_error_problem(message: str, argv: list[str]) -> tuple[str, str] | None:
    """(kind, one line) for absl's flag error `message`; None to let absl's own text stand (a
    config file that is broken rather than given a wrong variant)."""
    lines = [li.strip() for li in message.strip().splitlines() if li.strip()]
    if 'Error whilst parsing config file' in message:
        match = re.match(r'flag (--config=\S+): Error whilst parsing config file', lines[0])
        if lines[-1].startswith('ValueError: '):
            return 'config error', (
                f'{match[1] if match else "--config"}: {lines[-1][len("ValueError: ") :]}'
            )
        return None
    if match := re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', lines[0]):
        field, value, why = match.groups()
        default = _load_config(_config_path(argv))
        for part in field.split('.'):
            default = default.get(part) if isinstance(default, ml_collections.ConfigDict) else None
        kind = TYPE_NAMES.get(type(default))
        if kind:
            return 'config error', (
                f'--config.{field}={value}: config.{field} takes {kind} '
                f'(e.g. --config.{field}={default}), not {value!r}.'
            )
        return 'config error', f'--config.{field}={value}: {why}'
    if match := re.match(
        r'flag --(\w+)=None: Flag --\1 must have a value other than None', lines[0]
    ):
        return 'usage error', (
            f'--{match[1]} is required, e.g. '
            '--config=configs/brats.py:synthetic --workdir=runs/brats.'
        )
    return 'usage error', ' '.join(lines)


def _config_argument_problems(argv: list[str]) -> list[str]:
    """What is wrong with --config and its --config.* overrides in argv ([] if nothing is, or if
    the config cannot be loaded here: the original error then stands)."""
    from fedjax_med import validate

    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    path = _config_path(argv)
    overrides = [
        match[2] for arg in argv if (match := re.match(r'-{1,2}(no)?config\.([^=]+)', arg))
    ]
    if not path:
        return []
    if not os.path.isfile(path.split(':', 1)[0]):
        return [
            f'--config={path}: there is no file {path.split(":", 1)[0]!r}; give a config '
            'file and variant, e.g. --config=configs/brats.py:synthetic.'
        ]
    config = _load_config(path)
    if config is None:
        return []
    found = (validate.unknown_field_problem(config, o) for o in overrides)
    return [problem for problem in found if problem]


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the errors it reports as tracebacks or in several lines (an
    override of a field the locked config lacks: AttributeError; a missing config file: OSError;
    a value of the wrong type, a misspelt variant, a missing flag: flags.Error) as one line each
    and exit status 2; --help exits with 0."""
    try:
        args = flags.FLAGS(argv)
        _CONFIG.value.get('task')  # a config file that failed to load raises OSError here
        return args
    except SystemExit as e:  # absl's --help and --helpfull exit with status 1
        if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        found = _flag_error_problem(str(e), argv)
        if found is None:
            print(f'FATAL Flags parsing error:\n{e}', file=sys.stderr)
            sys.exit(2)
        _error(*found[:1], [found[1]])
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
    from fedjax_med import parallel, train, validate
    from fedjax_med import workdir as workdir_lib

    try:
        validate.validate(_CONFIG.value)  # again in train.run; here before any set-up
    except validate.ConfigError as e:
        _config_error(e.problems)
    if _NUM_PROCESSES.value > 1:
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value or not _COORDINATOR.value:
            raise app.UsageError(
                f'--num_processes={_NUM_PROCESSES.value} needs --coordinator_address=HOST:PORT '
                f'and --process_id in 0..{_NUM_PROCESSES.value - 1} '
                f'(got {_COORDINATOR.value!r}, {_PROCESS_ID.value}).'
            )
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir_lib.EXIT_ON_SECOND_SIGNAL = True
    parallel.enable_compilation_cache(_CACHE.value)
    from fedjax_med.data.errors import DataError

    try:
        train.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except validate.ConfigError as e:
        _config_error(e.problems)
    except DataError as e:  # a dataset that cannot be built or read: one line naming the file
        _error('data error', [str(e)])
    except workdir_lib.WorkdirError as e:
        _error('error', e.problems)
    except FloatingPointError as e:
        _error('training stopped', [str(e)], status=1)
    except workdir_lib.Stopped as e:
        print(f'fedjax_med: {e.message}', file=sys.stderr, flush=True)
        sys.exit(e.exit_status)


def _quiet_exit(signum, frame) -> None:
    """SIGINT / SIGTERM outside the run's own handlers (flag parsing, imports, the closing
    summary): no round is running and there is nothing to save, so exit at once, quietly."""
    del frame
    print(
        f'fedjax_med: stopped by {signal.Signals(signum).name} (no round was running; '
        'nothing to save).',
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)  # not SystemExit: a callback running now could swallow it


if __name__ == '__main__':
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _quiet_exit)
    app.run(main, flags_parser=_parse_flags)
