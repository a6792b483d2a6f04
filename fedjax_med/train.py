"""The round loop, and nothing else: `run(config, workdir)` trains and returns the final metrics.

`experiment.build` makes everything the run is made of (data on the devices, model, privacy
plan, the jitted round, the round planner, the evaluator); this module resumes it, runs the
rounds (the jitted round, accounting, evaluation, logging, checkpoints) and writes the summary.
"""

import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from fedjax_med import checkpoint as ckpt_lib
from fedjax_med import closing, experiment, health, host_round, parallel, writers
from fedjax_med import workdir as workdir_lib
from fedjax_med.tasks import TASKS
from fedjax_med.validate import validate


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    num_devices: int | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
    hooks: Sequence[Callable[[int], None]] = (),
) -> dict:
    """Trains as configured; resumes from the newest intact checkpoint in `workdir` if there is
    one, and prints a closing summary.

    The workdir is locked for the run, a previous run's outputs are never overwritten unless
    `overwrite`, and SIGINT / SIGTERM stop at the end of a round with it checkpointed
    (`workdir.py`).

    Args:
      config: a config from configs/ (validated here).
      workdir: where config.json, metrics.jsonl and checkpoints/ go.
      num_devices: use only the first N devices (default: all).
      stop_after: stop after this many rounds in this process (tests of interruption).
      overwrite: delete a previous run in `workdir` (its checkpoints and outputs) and start over.
      hooks: called with the number of rounds done after each round is logged and checkpointed
        (e.g. launch/profile_rounds.py starts and stops a profiler trace).
    Returns:
      The last row written to metrics.jsonl plus 'summary' entries.
    Raises:
      validate.ConfigError: a config that cannot run (or a real dataset that is not built).
      workdir.WorkdirError: the workdir is in use, holds another run, or outputs without a
        checkpoint.
      FloatingPointError: a round went non-finite (nothing of it logged or saved).
      workdir.Stopped: SIGINT / SIGTERM.
    """
    validate(config)
    primary = parallel.is_primary()
    with workdir_lib.Session(workdir, config, overwrite=overwrite, primary=primary) as session:
        summary = _run(config, workdir, num_devices, stop_after, session, hooks)
    if primary:
        closing.print_summary(
            summary,
            workdir=workdir,
            main_metric=TASKS[config.task].main_metric,
            num_rounds=config.num_rounds,
            command_s=time.time() - session.started,
        )
    return summary


# Long on purpose: set-up (about 30 lines) then the loop over rounds (about 40), which share
# the run's state (state, writer, checkpointer, cumulative bytes); the loop fits one screen.
def _run(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_devices: int | None,
    stop_after: int | None,
    session: workdir_lib.Session,
    hooks,
) -> dict:
    validate(config)
    # With several processes (multi-host) every process runs this function on the same inputs;
    # process 0 alone writes files and prints.
    primary = parallel.is_primary()
    say = (lambda *a: print(*a, flush=True)) if primary else (lambda *a: None)
    os.makedirs(workdir, exist_ok=True)
    config_dict = json.loads(config.to_json_best_effort())
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, 'checkpoints'), config.checkpoints_to_keep
    )
    latest = _check_resume(session, checkpointer, config_dict)
    if primary:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)

    exp = experiment.build(config, parallel.make_mesh(num_devices), warm_start=latest is None)
    if exp.init_source:
        say(f'Initialised from {exp.init_source[0]} (its round {exp.init_source[1]})')
    logging.info('Model %s: %s parameters', config.model.name, f'{exp.num_params:,}')
    say(
        f'Model {config.model.name}: {exp.num_params:,} parameters; {exp.num_clients} training '
        f'client(s) on {exp.mesh.devices.size} device(s)'
        + (f' in {jax.process_count()} processes' if jax.process_count() > 1 else '')
    )

    state, start, history, cum = exp.state, 0, [], {'up': 0, 'down': 0}
    if latest is not None:  # its config was checked above
        state, host = checkpointer.restore(latest, state)
        start, history, cum = host['round'], host['history'], host['cum_bytes']
        exp.privacy.load_state_dict(host['privacy'])
        say(session.resume_line(start, config.num_rounds))
    writer = writers.create_default_writer(
        workdir, history, primary=primary, tensorboard=config.get('tensorboard', True)
    )
    monitor = health.RoundMonitor(
        config,
        float(optax.tree.norm(exp.params)),
        history,
        primary=primary,
        noise=health.noise_norm(config, exp.privacy, exp.num_params),
    )
    end = config.num_rounds if stop_after is None else min(config.num_rounds, start + stop_after)
    saved, times, last = start, [], (history[-1] if history else {})

    def save(done: int) -> None:
        """Checkpoints the state after `done` rounds."""
        nonlocal saved
        checkpointer.save(
            done,
            state,
            {
                'round': done,
                'history': writer.history,
                'cum_bytes': cum,
                'privacy': exp.privacy.state_dict(),
                'config': config_dict,
            },
        )
        saved = done

    # Dispatch is asynchronous: round r+1's host work runs while round r computes, so the device
    # does not wait for index arrays, accounting or SecAgg set-up between rounds.
    upcoming = exp.planner.prepare(start) if start < end else None
    session.in_rounds = True  # from here a first SIGINT / SIGTERM stops after the round
    for r in range(start, end):
        t0 = time.perf_counter()
        current = upcoming
        if isinstance(current, str):  # the budget stop: keep the rounds run since the last save
            say(current)
            if r > saved:
                save(r)
            break
        state, m = exp.round_fn(
            state, exp.client_data, current.inputs, exp.round_key(config.seed, r)
        )
        exp.privacy.record(current.round_steps[: exp.num_clients])
        upcoming = exp.planner.prepare(r + 1) if r + 1 < end else None
        m = parallel.to_host(m)
        monitor.check(r, m)  # not finite: raises, nothing logged or saved (health.py)

        row = _train_row(r, m, current)
        if (r + 1) % config.eval_every == 0 or r + 1 == config.num_rounds:
            row.update(exp.evaluator(state.params))
            if exp.auditor is not None:  # config.audit: the canaries on the released model
                row.update(exp.auditor(state.params))
        row.update(exp.privacy.metrics())
        cum = _communication(exp, current, cum, row)
        jax.block_until_ready(state)
        row['time/round_s'] = time.perf_counter() - t0
        writer.write_row(row)
        last = row
        times.append(row['time/round_s'])
        say(
            _progress_line(
                row,
                exp.task.main_metric,
                config.num_rounds,
                eta=np.mean(times[-5:]) * (config.num_rounds - r - 1),
            )
        )
        if (r + 1) % config.checkpoint_every == 0 or r + 1 == end:
            save(r + 1)
        for hook in hooks:
            hook(r + 1)
        if session.stop_requested and r + 1 < end:  # SIGINT / SIGTERM: stop here, saved
            session.stop(done=r + 1, saved=saved, save=save, close=checkpointer.close)
    checkpointer.close()
    writer.close()
    summary = _summary(exp, last, budget_stop=isinstance(upcoming, str))
    if primary:
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(writers.json_safe(summary), f, indent=2)
    return summary


def _check_resume(session, checkpointer, config_dict: dict) -> int | None:
    """The round of the newest intact checkpoint to resume from, or None.

    A checkpoint in the workdir is resumed only by the same run: checked before anything is
    loaded, and before config.json is written, so a refused rerun leaves the workdir as it was.
    """
    latest = session.latest_intact_round(checkpointer)  # refuses to overwrite outputs
    if latest is not None:
        diffs = ckpt_lib.config_differences(
            checkpointer.restore_host(latest)['config'], config_dict
        )
        if diffs:
            checkpointer.close()
            raise session.resume_mismatch(diffs)
    return latest


def _train_row(r: int, m: dict, current: host_round.PreparedRound) -> dict:
    """The metrics row's training entries of round r (0-based) from the round's metrics."""
    row = {
        'round': r + 1,
        'train/loss': float(m['train/loss']),
        'train/update_norm': float(m.get('train/update_norm', np.nan)),
        'train/param_norm': float(m['train/param_norm']),
    }
    excluded = int(m.get('train/excluded_updates', 0))
    if excluded:  # a robust aggregator left out non-finite updates: the loss of the others
        row['train/loss'] = float(m['train/finite_update_loss'])
        row['train/excluded_updates'] = excluded
    if 'krum/selected' in m:  # the hospitals whose updates (multi-)Krum averaged
        slots = np.flatnonzero(np.asarray(m['krum/selected']) > 0)
        ids = current.participants
        row['train/krum_selected'] = [int(ids[j] if ids is not None else j) for j in slots]
    if 'train/norm_bounded_fraction' in m:
        row['train/norm_bounded_fraction'] = float(m['train/norm_bounded_fraction'])
    row.update(_clipping_diagnostics(m))
    if current.poisson_overflow:
        row['privacy/poisson_overflow'] = current.poisson_overflow
    if current.participants is not None:  # m of K hospitals took part: which
        row['train/participants'] = current.participants
    return row


def _communication(
    exp: experiment.Experiment, current: host_round.PreparedRound, cum: dict, row: dict
) -> dict:
    """Adds the round's comm/ entries to `row`; returns the cumulative bytes after it."""
    n_up, federated = current.num_participants, exp.federated
    up = (exp.bytes_up + current.protocol_up) if federated else 0
    down = (exp.bytes_down + current.protocol_down) if federated else 0
    # Every participant runs the protocol; a SecAgg dropout never sends its masked update.
    sent_up = up * n_up - (exp.bytes_up * (n_up - current.num_senders) if federated else 0)
    cum = {'up': cum['up'] + sent_up, 'down': cum['down'] + down * n_up}
    row.update(
        {
            'comm/bytes_up': up,
            'comm/bytes_down': down,
            'comm/cum_bytes_up_per_client': cum['up'] / max(exp.num_clients, 1),
            'comm/cum_bytes_down_per_client': cum['down'] / max(exp.num_clients, 1),
            # float32 update size / what a hospital actually sends (payload + protocol)
            'comm/compression_ratio': 4 * exp.num_params / up if up else None,
        }
    )
    return cum


def _progress_line(row: dict, main_metric: str, num_rounds: int, eta: float) -> str:
    main, eps = row.get(f'eval/{main_metric}'), row.get('privacy/epsilon')
    return (
        f'round {row["round"]:4d}/{num_rounds} | loss {row["train/loss"]:.4f}'
        + (f' | {main_metric} {main:.4f}' if main is not None else '')
        + (f' | eps {eps:.3f}' if eps is not None else '')
        + f' | {row["time/round_s"]:.2f} s/round | ETA {_fmt_time(eta)}'
    )


def _summary(exp: experiment.Experiment, last: dict, *, budget_stop: bool) -> dict:
    summary = dict(last)
    summary['summary/num_params'] = exp.num_params
    summary['summary/noise_multiplier'] = exp.privacy.noise_multiplier
    summary['summary/num_devices'] = int(exp.mesh.devices.size)
    summary['summary/num_training_clients'] = exp.num_clients
    summary['summary/round_traces'] = exp.round_fn.num_traces
    if budget_stop:  # the loop ended at the privacy budget
        summary['summary/stopped'] = 'privacy budget reached'
    return summary


def _clipping_diagnostics(m: dict) -> dict:
    """The round's clipping statistics, for choosing `dp.clip_norm`: under DP-SGD the fraction of
    examples whose gradient was clipped and their mean gradient norm before clipping (means over
    the local steps that ran); under DP-FedAvg the fraction of hospital updates left unclipped.
    They are computed from un-noised values, so they are diagnostics outside the privacy
    guarantee."""
    out = {}
    if 'clients/clip_fraction' in m:
        steps = max(float(np.sum(m['clients/num_steps'])), 1.0)
        out['dp/clip_fraction'] = float(np.sum(m['clients/clip_fraction'])) / steps
        out['dp/grad_norm_mean'] = float(np.sum(m['clients/grad_norm_mean'])) / steps
    if 'dp/unclipped_fraction' in m:
        out['dp/unclipped_fraction'] = float(m['dp/unclipped_fraction'])
    return out
