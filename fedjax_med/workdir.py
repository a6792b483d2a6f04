"""A run's workdir: one run at a time, no silent overwrite, clean stops, a checked resume.

`Session` wraps one `train.run` (process 0 of a multi-process run does the file work):

- **Lock.** `workdir/.lock` holds the PID and host of the run using the workdir, under an
  exclusive `flock`. A second run on the same workdir stops at once naming them. A lock left by
  a run that was killed (its `flock` is gone, and its PID no longer runs on this host) is taken
  over, saying so. A lock from another host whose `flock` is free cannot be checked from here:
  the run stops and says which file to delete. The lock file is removed when the run ends.
- **Outputs.** A workdir that holds a previous run's outputs (metrics.jsonl with rows,
  summary.json, or a config.json that is not a fedjax_med config) but no checkpoint to resume
  from is not overwritten unless `overwrite=True` (`--overwrite`), which deletes that run's
  files (and checkpoints) first.
- **Checkpoints.** `latest_intact_round` reads the newest checkpoint in full before it is
  trusted; one that cannot be read (truncated files or metadata, a missing `state/`, an empty
  step folder, any other restore failure) is moved to `workdir/checkpoints.broken/` and the
  next older one is tried, saying so.
- **Signals.** During the rounds, the first SIGINT / SIGTERM asks the round loop to stop at the
  end of the round in progress, with that round checkpointed (`stop`); a second one stops at
  once, as does one during set-up (nothing to save yet). Either way the run ends with one line
  and `Stopped` (exit status 130 / 143 on the command line).
- **Data.** A real dataset that is not built stops the run before the workdir is created; a
  workdir this run created is removed again if the run fails before its first checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

from fedjax_med.data.registry import SYNTHETIC
from fedjax_med.writers import TENSORBOARD_DIR

LOCK_NAME = '.lock'
BROKEN_DIR = 'checkpoints.broken'
# The files a run writes (besides checkpoints/ and the lock): what --overwrite deletes.
RUN_FILES = ('metrics.jsonl', 'summary.json', 'config.json')
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
# The command line sets this: a second signal then ends the process at once (os._exit) rather
# than raising Stopped, which a callback running at that moment (e.g. a garbage-collection hook)
# could swallow. Library callers (notebooks) keep the exception.
EXIT_ON_SECOND_SIGNAL = False


class WorkdirError(ValueError):
    """A run refused because of the state of its workdir; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__('\n'.join(self.problems))


class Stopped(KeyboardInterrupt):
    """The run stopped on SIGINT / SIGTERM; `message` says where, `exit_status` is 130 / 143."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message
        self.exit_status = EXIT_STATUS.get(signum, 128 + signum)


def _note(message: str) -> None:
    print(f'fedjax_med: {message}', file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------
# The lock
# -------------------------------------------------------------------------------------------------


def _pid_runs_here(pid: int) -> bool:
    """Whether `pid` is a running process of this host that could be a fedjax_med run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmdline = f.read()
    except OSError:
        return True  # no /proc: assume it is the run
    status = ''
    try:
        with open(f'/proc/{pid}/stat') as f:
            status = f.read().rsplit(')', 1)[-1].split()[0]
    except (OSError, IndexError):
        pass
    # A zombie has finished; a reused PID of an unrelated program is not the run.
    return status != 'Z' and (b'python' in cmdline or b'fedjax' in cmdline)


class WorkdirLock:
    """An exclusive lock on `workdir/.lock`, recording the holder's PID, host and start time."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    @staticmethod
    def _describe(holder: dict) -> str:
        started = holder.get('started')
        when = (
            f', started {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}'
            if isinstance(started, (int, float))
            else ''
        )
        return f'PID {holder.get("pid", "?")} on host {holder.get("host", "?")}{when}'

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors='replace').strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {'pid': '?', 'host': '?'}
        return holder if isinstance(holder, dict) else {'pid': '?', 'host': '?'}

    def _in_use(self, holder: dict) -> WorkdirError:
        return WorkdirError(
            [
                f'{os.path.dirname(self.path)} is in use by another run '
                f'({self._describe(holder)}). '
                'Wait for it to finish or stop it, or give this run another --workdir.'
            ]
        )

    # Long on purpose: one retry loop over the lock's states (free, live, stale, on another
    # host, flock unsupported); each branch is a few lines and they share the open descriptor.
    def acquire(self) -> str | None:
        """Takes the lock; returns a note when it took over a stale one. Raises WorkdirError when
        a live run holds it (or one on another host may)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            flock_works = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as e:  # a file system without flock: the record alone decides
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                flock_works = False
            try:  # a run that released the lock unlinked the file we may have opened: retry
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._read(fd)
        note = None
        if holder:
            here = holder.get('host') == socket.gethostname()
            pid = holder.get('pid')
            alive = here and isinstance(pid, int) and pid != os.getpid() and _pid_runs_here(pid)
            if alive and not flock_works:
                os.close(fd)
                raise self._in_use(holder)
            if not here:
                os.close(fd)
                raise WorkdirError(
                    [
                        f'{os.path.dirname(self.path)} is locked by a run on another host '
                        f'({self._describe(holder)}), which cannot be checked from here. If no run '
                        f'uses this workdir any more, delete {self.path} and rerun.'
                    ]
                )
            gone = 'which no longer holds it' if alive else 'which is no longer running'
            note = (
                f'taking over the lock of {os.path.dirname(self.path)} left by '
                f'{self._describe(holder)}, {gone}.'
            )
        record = json.dumps(
            {
                'pid': os.getpid(),
                'host': socket.gethostname(),
                'started': time.time(),
                'argv': sys.argv[:1],
            }
        )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record.encode())
        os.fsync(fd)
        self._fd = fd
        return note

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlink while still holding the flock: a waiting run then sees a new file
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


# -------------------------------------------------------------------------------------------------
# Previous outputs, broken checkpoints
# -------------------------------------------------------------------------------------------------


def previous_outputs(workdir: str) -> list[str]:
    """The files of a previous run in `workdir` that a fresh start would overwrite: metrics.jsonl
    with rows, summary.json, and config.json with them or when it is not a fedjax_med config (a
    config.json of ours alone was left by a start that ended before its first round: nothing to
    lose)."""
    found = []
    metrics = os.path.join(workdir, 'metrics.jsonl')
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append('metrics.jsonl')
    if os.path.exists(os.path.join(workdir, 'summary.json')):
        found.append('summary.json')
    config_path = os.path.join(workdir, 'config.json')
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                ours = {'task', 'mode', 'data', 'dp', 'num_rounds'} <= set(json.load(f))
        except (OSError, ValueError, TypeError):
            ours = False
        if found or not ours:
            found.append('config.json')
    return found


def clear_previous_run(workdir: str) -> list[str]:
    """--overwrite: deletes a previous run's files (checkpoints/, checkpoints.broken/,
    tensorboard/, metrics.jsonl, summary.json, config.json); returns what it deleted. Other files
    stay."""
    deleted = []
    for name in ('checkpoints', BROKEN_DIR, TENSORBOARD_DIR):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            deleted.append(name + '/')
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            os.remove(path)
            deleted.append(name)
    return deleted


def _json_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f'{os.path.basename(path)} is missing'
    try:
        with open(path) as f:
            json.load(f)
    except ValueError:
        return f'{os.path.basename(path)} is truncated or not JSON'
    except OSError as e:
        return f'{os.path.basename(path)} cannot be read ({e.strerror})'
    return None


def structural_problem(step_dir: str) -> str | None:
    """Why the checkpoint folder `step_dir` is visibly incomplete (None if it looks whole): the
    files Orbax writes for the 'state' and 'host' items must be there, metadata parseable."""
    if not os.listdir(step_dir):
        return 'the folder is empty'
    for sub in ('state', 'host'):
        if not os.path.isdir(os.path.join(step_dir, sub)):
            return f'its {sub}/ folder is missing'
    for rel in (
        '_CHECKPOINT_METADATA',
        os.path.join('state', '_METADATA'),
        os.path.join('host', 'metadata'),
    ):
        problem = _json_problem(os.path.join(step_dir, rel))
        if problem:
            return problem.replace(os.path.basename(rel), rel, 1)
    return None


def _short(error: BaseException) -> str:
    """A restore error in a few words (TensorStore messages run to kilobytes)."""
    text = ' '.join(str(error).split())
    for marker, words in (
        ('OUT_OF_RANGE', 'an array file is truncated'),
        ('DATA_LOSS', 'an array file is corrupt'),
        ('NOT_FOUND', 'an array file is missing'),
        ('while reading array', 'an array file cannot be read'),
    ):
        if marker in text:
            return words
    return f'{type(error).__name__}: {text[:120]}'


_RESTORE_NOISE = ('Event loop is closed', 'while reading array')


def _quiet_failed_restores() -> None:
    """After a failed restore, TensorStore reads still in flight finish on Orbax's closed event
    loop and report it through `sys.unraisablehook` (a traceback per read, printed at any later
    time); such reports are dropped from now on. Any other unraisable error is reported."""
    previous = sys.unraisablehook
    if getattr(previous, 'fedjax_med_quiet', False):
        return

    def hook(unraisable):
        text = str(unraisable.exc_value)
        if not any(noise in text for noise in _RESTORE_NOISE):
            previous(unraisable)

    hook.fedjax_med_quiet = True
    sys.unraisablehook = hook


def _step_dirs(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        (
            int(n)
            for n in os.listdir(directory)
            if n.isdigit() and os.path.isdir(os.path.join(directory, n))
        ),
        reverse=True,
    )


def set_aside(directory: str, step: int) -> str:
    """Moves checkpoint `step` from `directory` to `directory`.broken/ (never deleted)."""
    broken = os.path.join(os.path.dirname(os.path.abspath(directory)), BROKEN_DIR)
    os.makedirs(broken, exist_ok=True)
    target = os.path.join(broken, str(step))
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(broken, f'{step}.{n}')
    os.replace(os.path.join(directory, str(step)), target)
    return target


def _report_broken(directory: str, step: int, problem: str, primary: bool, note) -> None:
    older = [s for s in _step_dirs(directory) if s < step]
    where = (
        f'falling back to round {older[0]}'
        if older
        else 'no older checkpoint is left to resume from'
    )
    if primary:
        target = set_aside(directory, step)
        note(
            f'warning: the checkpoint of round {step} cannot be read ({problem}); moved it to '
            f'{target}; {where}.'
        )


def set_aside_incomplete(directory: str, *, primary: bool = True, note=_note) -> None:
    """Moves the checkpoints newer than the newest complete-looking one (`structural_problem`)
    out of `directory`, before Orbax opens it (it logs errors on such folders)."""
    for step in _step_dirs(directory):
        problem = structural_problem(os.path.join(directory, str(step)))
        if problem is None:
            return
        _report_broken(directory, step, problem, primary, note)


def latest_intact_round(
    checkpointer, directory: str, *, primary: bool = True, note=_note
) -> int | None:
    """The newest checkpoint round in `directory` that reads back whole (state and host), or
    None. Newer ones that do not are moved to checkpoints.broken/ (by the primary process) and
    reported, one line each; `checkpointer` (a `checkpoint.Checkpointer` on `directory`) is
    reloaded after a move."""
    moved = False
    for step in _step_dirs(directory):
        problem = structural_problem(os.path.join(directory, str(step)))
        if problem is None:
            if moved:
                checkpointer.reload()
            try:
                checkpointer.restore_arrays(step)
                return step
            except Exception as e:  # noqa: BLE001 - any failure to read means not intact
                problem = _short(e)
                _quiet_failed_restores()
                gc.collect()  # the failed reads' coroutines report now, to the quiet hook
        _report_broken(directory, step, problem, primary, note)
        moved = True
    if moved:
        checkpointer.reload()
    return None


# -------------------------------------------------------------------------------------------------
# Real data that is not built
# -------------------------------------------------------------------------------------------------


def missing_data_problem(config) -> str | None:
    """The problem with a real dataset (config.data.name) that is neither built in
    config.data.data_dir nor buildable from config.data.manual_dir, in one line (None when it
    is, and for the in-memory synthetic twins)."""
    data = config.data
    if data.name in SYNTHETIC and not data.synthetic_via_tfds:
        return None
    from fedjax_med.data import tfds_io  # TFDS: only for data that needs it

    builder = tfds_io.builder_for(data, config.seed)
    if tfds_io.is_built(builder) or not getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
        return None
    manual = data.manual_dir
    if manual and os.path.isdir(manual) and os.listdir(manual):
        return None  # built at start-up from the raw files
    where = (
        f'config.data.manual_dir={manual!r} is missing or empty'
        if manual
        else 'config.data.manual_dir is empty'
    )
    return (
        f'config.data.name={data.name!r}: the dataset is not built in '
        f'{builder.data_path} (config.data.data_dir={data.data_dir!r}) and {where}. '
        'Build it once with '
        f'python -m fedjax_med.data.build --dataset={data.name} --manual_dir=RAW '
        '--data_dir=DIR and set config.data.data_dir=DIR (README, "Real data"), or use a '
        'synthetic variant such as :synthetic.'
    )


# -------------------------------------------------------------------------------------------------
# One run's session
# -------------------------------------------------------------------------------------------------


class Session:
    """The workdir side of one `train.run` call (see the module docstring)."""

    def __init__(self, workdir: str, config, *, overwrite: bool = False, primary: bool = True):
        self.workdir, self.config, self.overwrite, self.primary = (
            workdir,
            config,
            overwrite,
            primary,
        )
        self.lock = WorkdirLock(workdir)
        self.created = False
        self.had_checkpoints_dir = False
        self.stop_signal: int | None = None
        self.in_rounds = False  # set by the round loop: a signal before it stops at once
        self._handlers: dict = {}
        self.started = time.time()

    # -- entering and leaving ------------------------------------------------------------------
    def __enter__(self) -> Session:
        problem = missing_data_problem(self.config)
        if problem:
            from fedjax_med.validate import ConfigError

            raise ConfigError([problem])
        self.created = not os.path.exists(self.workdir)
        self.had_checkpoints_dir = os.path.isdir(os.path.join(self.workdir, 'checkpoints'))
        self._install_signal_handlers()
        os.makedirs(self.workdir, exist_ok=True)
        try:
            if self.primary:
                note = self.lock.acquire()
                if note:
                    _note(note)
                if self.overwrite:
                    deleted = clear_previous_run(self.workdir)
                    if deleted:
                        _note(
                            f'--overwrite: deleted the previous run in {self.workdir} '
                            f'({", ".join(deleted)}).'
                        )
            set_aside_incomplete(os.path.join(self.workdir, 'checkpoints'), primary=self.primary)
            self._sync('fedjax_med_workdir_ready')
        except BaseException:
            self._leave(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._leave(failed=exc_type is not None)

    def _leave(self, failed: bool) -> None:
        self._restore_signal_handlers()
        checkpoints = os.path.join(self.workdir, 'checkpoints')
        if failed and self.created and self.primary and not _step_dirs(checkpoints):
            # Nothing was trained here: leave no workdir behind (only files this run wrote).
            self.lock.release()
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        if failed and self.primary and not self.had_checkpoints_dir:
            with contextlib.suppress(OSError):  # the empty folder the checkpointer made
                os.rmdir(checkpoints)
        self.lock.release()

    def _sync(self, name: str) -> None:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # -- checkpoints and previous outputs ------------------------------------------------------
    def latest_intact_round(self, checkpointer) -> int | None:
        """The round to resume from (None: start afresh); refuses to overwrite a previous run's
        outputs that have no checkpoint left, unless --overwrite."""
        directory = os.path.join(self.workdir, 'checkpoints')
        latest = latest_intact_round(checkpointer, directory, primary=self.primary)
        self._sync('fedjax_med_checkpoints_checked')
        if latest is None:
            found = previous_outputs(self.workdir)
            if found:
                checkpointer.close()
                broken = _step_dirs(os.path.join(self.workdir, BROKEN_DIR))
                why = (
                    'no checkpoint that can be read (see checkpoints.broken/)'
                    if broken
                    else 'no checkpoint to resume from'
                )
                raise WorkdirError(
                    [
                        f'{self.workdir} holds the outputs of a previous run ({", ".join(found)}) '
                        f'but {why}; starting afresh would overwrite them. Use another --workdir, '
                        'or add --overwrite to delete that run and start over.'
                    ]
                )
        return latest

    def resume_mismatch(self, diffs: list[str]) -> WorkdirError:
        fix = (
            "Give the checkpoint's value to resume, use another --workdir, or add "
            '--overwrite to delete that run and start over.'
        )
        return WorkdirError(
            [
                f'cannot resume {self.workdir}, which holds a checkpoint of a different run: '
                + (
                    f'{d} (Or add --overwrite to delete that run.)'
                    if d.endswith('.')
                    else f'{d}. {fix}'
                )
                for d in diffs
            ]
        )

    def resume_line(self, start: int, num_rounds: int) -> str:
        if start >= num_rounds:
            return (
                f'{self.workdir} already holds the finished run ({start}/{num_rounds} '
                'rounds); nothing to train.'
            )
        return f'Resumed from round {start} in {self.workdir}'

    # -- signals -------------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in EXIT_STATUS:
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _on_signal(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.in_rounds and self.stop_signal is None:
            self.stop_signal = signum
            if self.primary:
                _note(
                    f'{name}: stopping after the round in progress, with a checkpoint '
                    f'({name} again stops at once).'
                )
            return
        when = 'at once' if self.stop_signal is not None else 'during set-up'
        stopped = Stopped(signum, f'stopped by {name} {when}; {self._last_checkpoint_text()}.')
        if not EXIT_ON_SECOND_SIGNAL:
            raise stopped
        _note(stopped.message)
        self._leave(failed=True)
        os._exit(stopped.exit_status)

    def _last_checkpoint_text(self) -> str:
        steps = _step_dirs(os.path.join(self.workdir, 'checkpoints'))
        if not steps:
            return 'no checkpoint was saved (a rerun starts from round 0)'
        return (
            f'the last checkpoint is round {steps[0]} in {self.workdir} (rerun the same '
            'command to resume)'
        )

    def stop(self, *, done: int, saved: int, save, close) -> None:
        """Called by the round loop at a round boundary once a stop was requested: checkpoints
        round `done` unless it is (`saved`), closes the checkpointer and raises Stopped."""
        if done > saved:
            save(done)
        close()
        name = signal.Signals(self.stop_signal).name
        raise Stopped(
            self.stop_signal,
            f'stopped by {name} after round {done}; the last checkpoint is round '
            f'{done} in {self.workdir} (rerun the same command to resume).',
        )
