"""Fault injection: what a run does when things go wrong around it (issue #20).

A second run on a locked workdir, a stale lock, corrupt checkpoints (each falls back to the
previous intact one and ends where an uninterrupted run ends), a previous run's outputs without
a checkpoint (refused unless --overwrite), a server step or hospital update that goes non-finite
(stopped before the round is logged or saved, naming the setting), bad values and flags (exit 2,
one line per problem), SIGINT / SIGTERM (exit 130 / 143 with the round checkpointed), --help.

Runs share one finished 3-round smoke run (module fixture), copied per test; command-line cases
that stop at start-up run as concurrent subprocesses.
"""

import contextlib
import glob
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from configs import chestxray14
from fedjax_med import health, train, workdir
from fedjax_med.validate import ConfigError, validate
from tests.conftest import REPO

SMOKE = 'configs/chestxray14.py:smoke'


def config(**fields):
    c = chestxray14.get_config('smoke')
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('__')
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def rows(path) -> list[dict]:
    with open(os.path.join(path, 'metrics.jsonl')) as f:
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith('time/')} for line in f
        ]


def cli(workdir_path, *args: str) -> list[str]:
    return [
        sys.executable,
        '-m',
        'fedjax_med.main',
        f'--config={SMOKE}',
        f'--workdir={workdir_path}',
        *args,
    ]


def run_captured(c, path, **kwargs):
    """train.run with its stdout and stderr captured: (summary or exception, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = train.run(c, str(path), **kwargs)
        except (ValueError, FloatingPointError) as e:
            result = e
    return result, out.getvalue(), err.getvalue()


def summary_block(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, li in enumerate(lines) if 'fedjax_med run summary' in li)
    # The command's own time differs between runs; the rest of the block is the same.
    return [li.split('; this command')[0] for li in lines[start:]]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """A finished, uninterrupted 3-round smoke run: (workdir, its stdout)."""
    path = tmp_path_factory.mktemp('faults') / 'straight'
    summary, out, err = run_captured(config(), path)
    assert isinstance(summary, dict), err
    return path, out


@pytest.fixture
def copy_of(straight, tmp_path):
    def make(name='w'):
        target = tmp_path / name
        shutil.copytree(straight[0], target)
        return target

    return make


# ---------------------------------------------------------------------------------------------
# The closing summary
# ---------------------------------------------------------------------------------------------


def test_a_run_ends_with_a_summary_and_a_rerun_prints_the_same(straight, copy_of):
    path, first = straight
    block = summary_block(first)
    assert block[1] == 'rounds        3/3 (finished)'
    assert block[2].startswith('global test   mean_auroc ')
    assert any(li.startswith('communication ') and 'MB up' in li for li in block)
    assert (
        f'outputs       {path}: metrics.jsonl, summary.json, config.json, checkpoints/, '
        'tensorboard/'
    ) in block
    assert f'tensorboard   tensorboard --logdir {path}' in block
    assert f'report        python -m fedjax_med.report {path}' in block
    again = copy_of()
    _, out, _ = run_captured(config(), again)
    assert f'{again} already holds the finished run (3/3 rounds); nothing to train.' in out
    assert [li.replace(str(again), str(path)) for li in summary_block(out)] == block


# ---------------------------------------------------------------------------------------------
# The workdir lock
# ---------------------------------------------------------------------------------------------


def _hold_lock(path):
    """A process that holds the lock of `path` until its stdin closes."""
    code = (
        'import sys; from fedjax_med.workdir import WorkdirLock; '
        f'lock = WorkdirLock({str(path)!r}); lock.acquire(); print("locked", flush=True); '
        'sys.stdin.read(); lock.release()'
    )
    holder = subprocess.Popen(
        [sys.executable, '-c', code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == 'locked'
    return holder


def test_a_second_run_on_a_locked_workdir_refuses_naming_the_holder(tmp_path):
    path = tmp_path / 'w'
    path.mkdir()
    holder = _hold_lock(path)
    try:
        error, _, _ = run_captured(config(), path)
    finally:
        holder.stdin.close()
        holder.wait()
    assert isinstance(error, workdir.WorkdirError)
    (line,) = error.problems
    assert line.startswith(
        f'{path} is in use by another run (PID {holder.pid} on host '
        f'{socket.gethostname()}, started '
    )
    assert os.listdir(path) == []  # nothing written; the holder removed its lock


def test_a_stale_lock_of_a_killed_run_is_taken_over(copy_of):
    path = copy_of()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (path / '.lock').write_text(
        json.dumps({'pid': dead.pid, 'host': socket.gethostname(), 'started': time.time() - 60})
    )
    summary, _, err = run_captured(config(), path)
    assert isinstance(summary, dict)
    assert (
        f'fedjax_med: taking over the lock of {path} left by PID {dead.pid} on host '
        f'{socket.gethostname()}'
    ) in err and 'which is no longer running.' in err
    assert not (path / '.lock').exists()  # released at the end


def test_a_lock_from_another_host_is_not_taken_over(copy_of):
    path = copy_of()
    (path / '.lock').write_text(json.dumps({'pid': 1, 'host': 'elsewhere-0'}))
    error, _, _ = run_captured(config(), path)
    assert isinstance(error, workdir.WorkdirError)
    assert f'delete {path / ".lock"} and rerun' in error.problems[0]


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints: fall back to the newest intact one, same result
# ---------------------------------------------------------------------------------------------


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


def _largest_array_file(step):
    files = [f for f in glob.glob(f'{step}/state/**/d/*', recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


CORRUPTIONS = {
    'truncated array file': (lambda s: _truncate(_largest_array_file(s)), 'an array file'),
    'truncated state metadata': (
        lambda s: _truncate(f'{s}/state/_METADATA'),
        'state/_METADATA is truncated',
    ),
    'truncated checkpoint metadata': (
        lambda s: _truncate(f'{s}/_CHECKPOINT_METADATA'),
        '_CHECKPOINT_METADATA is truncated',
    ),
    'truncated host state': (
        lambda s: _truncate(f'{s}/host/metadata'),
        'host/metadata is truncated',
    ),
    'deleted state folder': (lambda s: shutil.rmtree(f'{s}/state'), 'its state/ folder is missing'),
    'empty step folder': (lambda s: [shutil.rmtree(s), os.makedirs(s)], 'the folder is empty'),
    'garbage array files': (
        lambda s: [
            open(f, 'wb').write(os.urandom(os.path.getsize(f)))
            for f in glob.glob(f'{s}/state/**/d/*', recursive=True)
        ],
        'an array file',
    ),
}


@pytest.mark.parametrize('corruption', list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(straight, copy_of, corruption):
    path = copy_of()
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(str(path / 'checkpoints' / '3'))
    summary, out, err = run_captured(config(), path)
    assert isinstance(summary, dict), summary
    assert (f'fedjax_med: warning: the checkpoint of round 3 cannot be read ({reason}') in err
    assert f'moved it to {path}/checkpoints.broken/3; falling back to round 2.' in err
    assert 'Traceback' not in err and 'TensorStore' not in err
    assert f'Resumed from round 2 in {path}' in out
    assert rows(path) == rows(straight[0])  # round 3 again, exactly as the first time
    assert sorted(os.listdir(path / 'checkpoints')) == ['2', '3']


def test_no_intact_checkpoint_left_refuses_to_overwrite_the_outputs(copy_of):
    path = copy_of()
    for step in ('2', '3'):
        shutil.rmtree(path / 'checkpoints' / step / 'state')
    before = (path / 'metrics.jsonl').read_text()
    error, _, err = run_captured(config(), path)
    assert err.count('cannot be read (its state/ folder is missing)') == 2
    assert isinstance(error, workdir.WorkdirError)
    assert error.problems[0].startswith(
        f'{path} holds the outputs of a previous run (metrics.jsonl, summary.json, config.json) '
        'but no checkpoint that can be read (see checkpoints.broken/)'
    )
    assert (path / 'metrics.jsonl').read_text() == before


# ---------------------------------------------------------------------------------------------
# Never overwrite a previous run's outputs without --overwrite
# ---------------------------------------------------------------------------------------------


def test_outputs_without_a_checkpoint_are_kept_unless_overwrite(copy_of):
    path = copy_of()
    shutil.rmtree(path / 'checkpoints')
    before = {f: (path / f).read_text() for f in ('metrics.jsonl', 'summary.json', 'config.json')}
    error, _, _ = run_captured(config(), path)
    assert isinstance(error, workdir.WorkdirError)
    assert error.problems == [
        f'{path} holds the outputs of a previous run (metrics.jsonl, summary.json, config.json) '
        'but no checkpoint to resume from; starting afresh would overwrite them. Use another '
        '--workdir, or add --overwrite to delete that run and start over.'
    ]
    assert {f: (path / f).read_text() for f in before} == before
    # --overwrite starts over, here with another config (which a resume would refuse).
    summary, _, err = run_captured(config(num_rounds=1, seed=1), path, overwrite=True)
    assert isinstance(summary, dict) and summary['round'] == 1
    assert (
        f'fedjax_med: --overwrite: deleted the previous run in {path} (tensorboard/, '
        'metrics.jsonl, summary.json, config.json).'
    ) in err
    assert [r['round'] for r in rows(path)] == [1]


def test_a_config_json_that_is_not_ours_is_not_overwritten(tmp_path):
    (tmp_path / 'config.json').write_text('{"my": "project"}')
    error, _, _ = run_captured(config(), tmp_path)
    assert isinstance(error, workdir.WorkdirError) and '(config.json)' in error.problems[0]
    assert (tmp_path / 'config.json').read_text() == '{"my": "project"}'


# ---------------------------------------------------------------------------------------------
# Non-finite rounds: stopped before anything of the round is logged or saved
# ---------------------------------------------------------------------------------------------


def test_a_server_step_that_blows_up_stops_before_the_round_is_logged_or_saved(tmp_path):
    # Round 1's server step multiplies the mean update by 1e30: the new parameters overflow
    # while every hospital update was finite.
    error, _, _ = run_captured(config(server__learning_rate=1e30), tmp_path)
    assert isinstance(error, FloatingPointError)
    msg = str(error)
    assert msg.startswith(
        'Round 1: the new global parameters are not finite (their norm is inf) '
        'although every hospital update was finite'
    )
    assert 'Lower config.server.learning_rate (now 1e+30' in msg and '\n' not in msg
    assert (tmp_path / 'metrics.jsonl').read_text() == ''
    assert not os.path.exists(tmp_path / 'checkpoints')  # no round saved (empty folder removed)


def test_hospitals_failing_after_server_steps_grew_the_model_blame_the_server(tmp_path):
    # Round 1's server step leaves finite but huge parameters (logged and saved); round 2's
    # hospitals then produce NaN, which is the server learning rate's doing.
    error, _, _ = run_captured(config(server__learning_rate=1e17, num_rounds=2), tmp_path)
    assert isinstance(error, FloatingPointError)
    msg = str(error)
    assert msg.startswith('Round 2: 4 hospital update(s) are not finite')
    assert 'The server steps had grown the global parameters' in msg
    assert 'Lower config.server.learning_rate (now 1e+17' in msg
    assert [r['round'] for r in rows(tmp_path)] == [1]
    assert os.listdir(tmp_path / 'checkpoints') == ['1']


def test_hospital_updates_that_blow_up_blame_the_local_learning_rate(tmp_path):
    error, _, _ = run_captured(config(local__learning_rate=1e30, local__optimizer='sgd'), tmp_path)
    assert isinstance(error, FloatingPointError)
    assert str(error).startswith('Round 1: 4 hospital update(s) are not finite')
    assert 'Lower config.local.learning_rate (now 1e+30)' in str(error)
    assert (tmp_path / 'metrics.jsonl').read_text() == ''


def test_huge_client_dp_noise_is_named_as_the_cause(tmp_path):
    error, _, _ = run_captured(config(dp__mode='client', dp__noise_multiplier=1e30), tmp_path)
    assert isinstance(error, FloatingPointError)
    msg = str(error)
    assert 'the server step blew up' in msg
    assert 'The client-level DP noise on the mean update has norm about' in msg
    assert 'lower config.dp.noise_multiplier (now 1e+30)' in msg
    assert 'config.server.learning_rate' not in msg


def test_a_growing_loss_warns_once(capsys):
    monitor = health.RoundMonitor(config(), 10.0, [])
    metrics = lambda loss: {
        'train/loss': loss,
        'train/nonfinite_updates': 0,
        'train/param_norm': 11.0,
        'train/update_norm': 1.0,
    }
    for r, loss in enumerate([0.6, 0.9, 70.0, 500.0]):
        monitor.check(r, metrics(loss))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        'fedjax_med: warning: round 3 training loss 70 is 117x the first '
        "round's (0.6): training is diverging. Lower "
        'config.local.learning_rate (now 0.003) or config.server.learning_rate'
    )
    # Resumed: the first round's loss comes from the history.
    monitor = health.RoundMonitor(config(), 10.0, [{'train/loss': 0.6, 'train/param_norm': 11.0}])
    monitor.check(5, metrics(61.0))
    assert 'round 6 training loss 61' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad values: one problem each, naming the field
# ---------------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
BAD_VALUES = [  # (field, value, how the one message starts after 'config.FIELD=VALUE ')
    ('dp.target_epsilon', NAN, 'must be a finite number >= 0.'),
    ('dp.target_epsilon', INF, 'must be a finite number >= 0.'),
    ('dp.noise_multiplier', NAN, 'must be a finite number >= 0.'),
    ('server.learning_rate', NAN, 'must be a finite number > 0.'),
    ('local.momentum', NAN, 'must be a finite number in [0, 1).'),
    ('local.epochs', INF, 'must be a finite number > 0.'),
    ('local.learning_rate', INF, 'must be a finite number > 0.'),
    ('server.learning_rate', 0.0, 'must be > 0.'),
    ('server.learning_rate', -1.0, 'must be > 0.'),
    ('dp.target_quantile', 0.0, 'must be in (0, 1)'),
    ('dp.target_quantile', 1.0, 'must be in (0, 1)'),
    ('dp.delta', 1.0, 'must be in [0, 1)'),
    ('dp.delta', -0.1, 'must be in [0, 1)'),
    ('compression.bits', 0, 'must be an integer in 1..24'),
    ('compression.bits', 25, 'must be an integer in 1..24'),
    ('compression.topk_fraction', 0.0, 'must be in (0, 1]'),
    ('compression.topk_fraction', 1.5, 'must be in (0, 1]'),
    ('secagg.clip', 0.0, 'must be > 0'),
    ('secagg.clip', -1.0, 'must be > 0'),
]


@pytest.mark.parametrize('field,value,expected', BAD_VALUES)
def test_each_bad_value_is_one_problem_naming_the_field(field, value, expected):
    with pytest.raises(ConfigError) as e:
        validate(config(**{field.replace('.', '__'): value}))
    (msg,) = e.value.problems
    assert msg.startswith(f'config.{field}={value!r} {expected}'), msg


def test_nan_fails_under_dp_too_and_infinite_count_noise_is_allowed():
    for field in ('dp__target_epsilon', 'dp__noise_multiplier', 'dp__clip_norm'):
        fields = {
            'dp__mode': 'sample',
            'local__sampling': 'poisson',
            'dp__noise_multiplier': 1.0,
            field: NAN,
        }
        with pytest.raises(ConfigError) as e:
            validate(config(**fields))
        (msg,) = e.value.problems
        assert msg.startswith(f'config.{field.replace("__", ".")}=nan must be a finite number')
    validate(config(dp__mode='client', dp__noise_multiplier=1.0, dp__count_noise_std=INF))


# ---------------------------------------------------------------------------------------------
# The command line: one line per problem, exit status 2, no traceback (run concurrently)
# ---------------------------------------------------------------------------------------------

# One command with a bad value in each field (every value of BAD_VALUES is checked above).
CLI_BAD_VALUES = [
    'server.learning_rate=nan',
    'local.momentum=nan',
    'local.epochs=inf',
    'dp.target_epsilon=inf',
    'dp.noise_multiplier=nan',
    'dp.target_quantile=1',
    'dp.delta=-0.1',
    'compression.bits=0',
    'compression.topk_fraction=1.5',
    'secagg.clip=0',
]


@pytest.fixture(scope='module')
def cli_results(straight, tmp_path_factory):
    """Every start-up refusal of the command line, run concurrently: name -> (process, workdir)."""
    base = tmp_path_factory.mktemp('cli')
    straight_path = straight[0]
    mismatch = base / 'mismatch'
    shutil.copytree(straight_path, mismatch)
    cases = {
        'help': ([sys.executable, '-m', 'fedjax_med.main', '--help'], None),
        'type': (cli(base / 'type', '--config.num_rounds=abc'), base / 'type'),
        'variant': (
            [
                sys.executable,
                '-m',
                'fedjax_med.main',
                '--config=configs/chestxray14.py:synthtic',
                f'--workdir={base / "v"}',
            ],
            base / 'v',
        ),
        'data': (
            [
                sys.executable,
                '-m',
                'fedjax_med.main',
                '--config=configs/chestxray14.py',
                f'--config.data.data_dir={base / "no_data"}',
                f'--workdir={base / "data"}',
            ],
            base / 'data',
        ),
        'mismatch': (cli(mismatch, '--config.seed=1'), mismatch),
        'values': (
            cli(base / 'values', *[f'--config.{v}' for v in CLI_BAD_VALUES]),
            base / 'values',
        ),
    }
    procs = {
        name: subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (argv, _) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, cases[name][1])
    return results


def _one_error_line(result, prefix='fedjax_med: config error: '):
    code, _, err, _ = result
    assert code == 2, err
    assert 'Traceback' not in err
    (line,) = err.splitlines()
    assert line.startswith(prefix), line
    return line[len(prefix) :]


def test_cli_help_exits_0(cli_results):
    code, out, _, _ = cli_results['help']
    assert code == 0 and '--overwrite' in out and '--workdir' in out


def test_cli_wrong_type_is_one_line(cli_results):
    assert _one_error_line(cli_results['type']) == (
        '--config.num_rounds=abc: config.num_rounds takes an integer (e.g. '
        "--config.num_rounds=3), not 'abc'."
    )
    assert not cli_results['type'][3].exists()


def test_cli_misspelt_variant_is_one_line_with_a_suggestion(cli_results):
    line = _one_error_line(cli_results['variant'])
    assert line.startswith("--config=configs/chestxray14.py:synthtic: Unknown variant 'synthtic'")
    assert line.endswith('Did you mean configs/chestxray14.py:synthetic?')


def test_cli_missing_dataset_is_one_line_and_leaves_no_workdir(cli_results):
    line = _one_error_line(cli_results['data'])
    assert line.startswith("config.data.name='nih_chestxray14': the dataset is not built in ")
    assert 'python -m fedjax_med.data.build --dataset=nih_chestxray14' in line
    assert not cli_results['data'][3].exists()


def test_cli_resume_with_another_seed_is_one_line(cli_results):
    line = _one_error_line(cli_results['mismatch'], 'fedjax_med: error: ')
    path = cli_results['mismatch'][3]
    assert line == (
        f'cannot resume {path}, which holds a checkpoint of a different run: seed: '
        "checkpoint has 0, config has 1. Give the checkpoint's value to resume, use "
        'another --workdir, or add --overwrite to delete that run and start over.'
    )


def test_cli_bad_values_are_one_line_each_naming_the_field(cli_results):
    code, _, err, path = cli_results['values']
    assert code == 2 and 'Traceback' not in err
    lines = err.splitlines()
    assert all(li.startswith('fedjax_med: config error: config.') for li in lines)
    named = sorted(li.split('config error: config.')[1].split('=')[0] for li in lines)
    assert named == sorted(v.split('=')[0] for v in CLI_BAD_VALUES)
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: stop after the round in progress, checkpointed, exit 130 / 143
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_round_in_progress_with_it_saved(tmp_path, signum):
    path = tmp_path / 'w'

    def signal_after_round_one():
        deadline = time.time() + 240
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                if (path / 'metrics.jsonl').read_text().count('\n') >= 1:
                    os.kill(os.getpid(), signum)
                    return
            time.sleep(0.01)

    threading.Thread(target=signal_after_round_one, daemon=True).start()
    err = io.StringIO()
    with pytest.raises(workdir.Stopped) as e, contextlib.redirect_stderr(err):
        train.run(config(num_rounds=1000, eval_every=1000, checkpoint_every=100), str(path))
    done = len(rows(path))
    name = signal.Signals(signum).name
    assert e.value.exit_status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert e.value.message == (
        f'stopped by {name} after round {done}; the last checkpoint is '
        f'round {done} in {path} (rerun the same command to resume).'
    )
    assert err.getvalue() == (
        f'fedjax_med: {name}: stopping after the round in progress, with '
        f'a checkpoint ({name} again stops at once).\n'
    )
    assert os.listdir(path / 'checkpoints') == [str(done)] and 1 <= done < 1000
    assert not (path / '.lock').exists() and not (path / 'summary.json').exists()
    assert signal.getsignal(signum) is not None  # the handlers were put back


def test_cli_sigint_exits_130_with_one_line_and_no_traceback(copy_of):
    # The run starts over a previous run's outputs with --overwrite.
    path = copy_of('over')
    shutil.rmtree(path / 'checkpoints')
    proc = subprocess.Popen(
        cli(
            path,
            '--config.num_rounds=1000',
            '--config.eval_every=1000',
            '--config.checkpoint_every=100',
            '--overwrite',
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith('round    1/1000'):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    done = len(rows(path))
    assert proc.returncode == 130, err
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
    assert err.splitlines() == [
        f'fedjax_med: --overwrite: deleted the previous run in {path} (tensorboard/, '
        'metrics.jsonl, summary.json, config.json).',
        'fedjax_med: SIGINT: stopping after the round in progress, with a checkpoint (SIGINT '
        'again stops at once).',
        f'fedjax_med: stopped by SIGINT after round {done}; the last checkpoint is round {done} '
        f'in {path} (rerun the same command to resume).',
    ]
    assert os.listdir(path / 'checkpoints') == [str(done)]
