"""The round loop, and nothing else: `run(config, workdir)` trains and returns the final metrics.

Sections, top to bottom: config -> data on the devices -> model -> privacy -> round function ->
resume -> rounds (sample hospitals, build batches, secure-aggregation set-up, the jitted round,
accounting, evaluation, logging, checkpoint) -> summary.
"""

import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fedjax_med import checkpoint as ckpt_lib
from fedjax_med import closing, comm, evaluation, health, parallel, rounds
from fedjax_med import workdir as workdir_lib
from fedjax_med.aggregation import compression, registry, secagg_host
from fedjax_med.data import batching
from fedjax_med.models import build_model
from fedjax_med.state import RoundInputs
from fedjax_med.tasks import TASKS
from fedjax_med.validate import ConfigError, validate

# Purposes of host-side random generators: np.random.default_rng([seed, round, PURPOSE, ...]).
# SecAgg's dropout draw is defined where it is drawn (aggregation/secagg_host.py).
HOST_PARTICIPANTS, HOST_BATCHES = 1, 2
HOST_SECAGG = secagg_host.HOST_SECAGG


def lr_schedule(lc: ml_collections.ConfigDict, num_rounds: int):
    if lc.schedule == 'constant':
        return lambda r: lc.learning_rate
    if lc.schedule == 'cosine':
        return optax.cosine_decay_schedule(lc.learning_rate, max(num_rounds, 1), alpha=0.1)
    return lambda r: lc.learning_rate * lc.decay_rate**r


def pool_clients(splits: list[dict]) -> dict:
    """All hospitals' arrays as one (the centralised baseline's single client)."""
    return {key: np.concatenate([s[key] for s in splits]) for key in ('image', 'label')}


def pad_examples(splits: list[dict], num_padded_clients: int) -> dict:
    """Per-hospital training arrays -> {'image': [K, n_max, ...], 'label': ...} (zero padded),
    kept in their storage dtypes: the round decodes each gathered batch (data/storage.py)."""
    n_max = max(len(s['image']) for s in splits)
    out = {}
    for key in ('image', 'label'):
        first = np.asarray(splits[0][key])
        arr = np.zeros((num_padded_clients, n_max, *first.shape[1:]), first.dtype)
        for k, s in enumerate(splits):
            arr[k, : len(s[key])] = s[key]
        out[key] = arr
    return out


def sample_participants(config, round_index: int, num_clients: int) -> np.ndarray:
    """Bool [K]: which hospitals take part this round (m of K, uniformly without replacement)."""
    m = config.clients_per_round
    if config.mode != 'federated' or m == 0 or m >= num_clients:
        return np.ones(num_clients, bool)
    rng = np.random.default_rng([config.seed, round_index, HOST_PARTICIPANTS])
    chosen = np.zeros(num_clients, bool)
    chosen[rng.choice(num_clients, m, replace=False)] = True
    return chosen


class PreparedRound(NamedTuple):
    """A round's inputs on the device and the host facts the loop logs about it."""

    inputs: RoundInputs
    round_steps: np.ndarray    # local steps each (padded) hospital runs
    num_participants: int
    num_senders: int           # participants that send their update (SecAgg dropouts do not)
    poisson_overflow: int      # Poisson draws cut to the maximum batch (logged when > 0)
    protocol_up: int           # SecAgg protocol bytes per hospital, up / down
    protocol_down: int


def json_safe(row: dict) -> dict:
    """`row` with NaN and infinite floats (e.g. AUROC of a label absent from a split), which are
    not JSON, as None (null), also inside lists."""
    fix = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    return {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in row.items()}


class MetricsWriter:
    """metrics.jsonl: one JSON object per round; rewritten from the checkpoint on resume."""

    def __init__(self, workdir: str, history: list[dict], *, write: bool = True):
        self.path = os.path.join(workdir, 'metrics.jsonl')
        self.history = list(history)
        self.enabled = write  # False on every process but the first of a multi-process run
        if self.enabled:
            with open(self.path, 'w') as f:
                f.writelines(json.dumps(h) + '\n' for h in self.history)

    def write(self, row: dict) -> None:
        row = json_safe(row)
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
            f.flush()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def run(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int | None = None,
        stop_after: int | None = None, overwrite: bool = False) -> dict:
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
        summary = _run(config, workdir, num_devices, stop_after, session)
    if primary:
        closing.print_summary(summary, workdir=workdir, main_metric=TASKS[config.task].main_metric,
                              num_rounds=config.num_rounds,
                              command_s=time.time() - session.started)
    return summary


def _run(config: ml_collections.ConfigDict, workdir: str, num_devices: int | None,
         stop_after: int | None, session: workdir_lib.Session) -> dict:
    # One function on purpose: its banner sections run once, top to bottom, and share many locals
    # (mesh, data, sizes, privacy, state); docs/ARCHITECTURE.md ("One run") walks through them.
    # ---------------------------------------------------------------------------------------------
    # Config
    # ---------------------------------------------------------------------------------------------
    validate(config)
    # With several processes (multi-host) every process runs this function on the same inputs;
    # process 0 alone writes files and prints.
    primary = parallel.is_primary()
    say = (lambda *a: print(*a, flush=True)) if primary else (lambda *a: None)
    os.makedirs(workdir, exist_ok=True)
    config_dict = json.loads(config.to_json_best_effort())
    # A checkpoint in workdir is resumed only by the same run: check before loading anything, and
    # before config.json is written, so a refused rerun leaves the workdir as it was.
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         config.checkpoints_to_keep)
    latest = session.latest_intact_round(checkpointer)  # refuses to overwrite outputs
    if latest is not None:
        diffs = ckpt_lib.config_differences(checkpointer.restore_host(latest)['config'],
                                            config_dict)
        if diffs:
            checkpointer.close()
            raise session.resume_mismatch(diffs)
    if primary:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(config_dict, f, indent=2, sort_keys=True)
    task = TASKS[config.task]
    federated, local_mode = config.mode == 'federated', config.mode == 'local'

    # ---------------------------------------------------------------------------------------------
    # Data on the devices
    # ---------------------------------------------------------------------------------------------
    from fedjax_med.data import sources  # heavy imports (TFDS) only once the config is valid

    data = sources.load_federated(config.data, config.seed)
    hospital_names = list(data.client_names)
    if config.data.get('train_on', 'hospitals') == 'public':  # pretraining on the public set
        train_splits = [pool_clients([data.public])]
    elif config.mode == 'centralized':
        train_splits = [pool_clients(data.clients_train)]
    else:
        train_splits = data.clients_train
    num_clients = len(train_splits)
    mesh = parallel.make_mesh(num_devices)
    k_pad = parallel.padded_num_clients(num_clients, mesh)
    sizes = np.array([len(s['image']) for s in train_splits] + [0] * (k_pad - num_clients))
    client_data = parallel.put_clients(pad_examples(train_splits, k_pad), mesh)
    test_global = evaluation.batch_split(data.test, config.eval_batch_size)
    # Labels and metadata (case, slice, patch, patient ids) of the global test split, on the
    # host, for the task's per-case metrics.
    case_metrics = bool(config.get('eval_case_metrics', True))
    test_host = {k: v for k, v in data.test.items() if k != 'image'} if case_metrics else None
    if local_mode:  # every hospital's model sees the whole split
        test_global = parallel.put_replicated(test_global, mesh)
    else:  # one model: each device evaluates its share of the batches
        test_global = parallel.put_clients(
            evaluation.pad_batches(test_global, mesh.devices.size), mesh)
    # Each hospital's own test split lives on the device that holds its training data.
    hospital_test = parallel.put_clients(parallel.pad_client_axis(
        evaluation.stack_splits(data.clients_test, config.eval_batch_size),
        parallel.padded_num_clients(len(data.clients_test), mesh)), mesh)
    logging.info('Hospitals: %s; training examples per training client: %s; test: %d',
                 hospital_names, sizes[:num_clients].tolist(), len(data.test['image']))

    # ---------------------------------------------------------------------------------------------
    # Model
    # ---------------------------------------------------------------------------------------------
    model = build_model(config.model, config.task)
    apply_fn = lambda params, x: model.apply(params, x)
    sample_image = jnp.zeros((1, *train_splits[0]['image'].shape[1:]), jnp.float32)
    # One jitted program instead of one small compilation per layer op (and, with the
    # persistent compilation cache, nothing to compile on a rerun); the values are identical.
    params = jax.jit(model.init)(jax.random.fold_in(jax.random.key(config.seed), 0),
                                 sample_image)
    if config.get('init_from') and latest is None:  # a resume restores its own parameters
        params, source_round, _ = ckpt_lib.load_params(config.init_from, params)
        say(f'Initialised from {config.init_from} (its round {source_round})')
    num_params = evaluation.param_count(params)
    logging.info('Model %s: %s parameters', config.model.name, f'{num_params:,}')
    say(f'Model {config.model.name}: {num_params:,} parameters; {num_clients} training '
        f'client(s) on {mesh.devices.size} device(s)'
        + (f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''))

    # ---------------------------------------------------------------------------------------------
    # Local steps per round and privacy
    # ---------------------------------------------------------------------------------------------
    lc = config.local
    steps = np.array([batching.steps_per_round(n, lc.batch_size, lc.epochs) if n else 0
                      for n in sizes])
    num_steps = int(steps.max())
    from fedjax_med import privacy_setup

    try:
        privacy = privacy_setup.PrivacySetup(config, sizes[:num_clients], steps[:num_clients])
    except ValueError as e:  # a privacy target these hospitals cannot meet: the user's to fix
        raise ConfigError([str(e)]) from None
    max_batch = lc.batch_size
    if lc.sampling == 'poisson':
        # Padded Poisson batches: a step that draws more than max_batch examples is truncated.
        # Under DP-SGD, max_batch keeps each hospital's chance of that anywhere in the run at
        # most 1e-3 of its delta, counted with its (planned) epsilon (data/batching.py).
        tail = batching.POISSON_TAIL
        if privacy.mode == 'sample':
            planned = config.dp.target_epsilon or float(np.max(
                privacy.accountant.epsilon_after(steps[:num_clients] * config.num_rounds)))
            tail = batching.run_overflow_tail(
                steps[:num_clients], config.num_rounds, privacy.deltas,
                epsilon=planned if math.isfinite(planned) and planned < 50 else None)
        max_batch = batching.poisson_max_batch(lc.batch_size, sizes[:num_clients], tail)
    expected_batch = np.where(sizes > 0, np.minimum(lc.batch_size, np.maximum(sizes, 1)),
                              1).astype(np.float32)
    noise_multiplier = np.zeros(k_pad, np.float32)  # padding hospitals never train
    noise_multiplier[:num_clients] = privacy.noise_multipliers

    # ---------------------------------------------------------------------------------------------
    # Round function, compression, communication sizes
    # ---------------------------------------------------------------------------------------------
    compressor = compression.make_compressor(config.compression) if federated else None
    round_fn = rounds.build_round_fn(apply_fn=apply_fn, task=task, config=config, mesh=mesh,
                                     client_noise_multiplier=privacy.noise_multiplier,
                                     expected_clients=privacy.expected_clients,
                                     compressor=compressor, model=model)
    bytes_down, bytes_up = comm.round_bytes(params, config) if federated else (0, 0)
    state = rounds.init_server_state(params, config, k_pad, mesh, compressor)
    eval_fn = evaluation.build_eval_fn(apply_fn, task)
    # The global test split also brings back what per-case (per-patient) metrics need.
    eval_fn_cases = (evaluation.build_eval_fn(apply_fn, task, example_outputs=True)
                     if case_metrics else eval_fn)
    if local_mode:
        eval_global = evaluation.per_hospital(eval_fn_cases, params_axis=0, data_axis=None,
                                              mesh=mesh)
        eval_own = evaluation.per_hospital(eval_fn, params_axis=0, data_axis=0, mesh=mesh)
    else:
        eval_global = evaluation.over_devices(eval_fn_cases, mesh)
        eval_own = evaluation.per_hospital(eval_fn, params_axis=None, data_axis=0,
                                           mesh=mesh)
    # Every round's client learning rate, computed once (not a device call per round).
    schedule = lr_schedule(lc, config.num_rounds)
    lr_by_round = np.array([schedule(r) for r in range(config.num_rounds)], np.float32)
    aggregation_weights = registry.spec(config.server.aggregator).weights

    # ---------------------------------------------------------------------------------------------
    # Resume
    # ---------------------------------------------------------------------------------------------
    start, history, cum = 0, [], {'up': 0, 'down': 0}
    if latest is not None:  # its config was checked above
        state, host = checkpointer.restore(latest, state)
        start, history, cum = host['round'], host['history'], host['cum_bytes']
        privacy.load_state_dict(host['privacy'])
        say(session.resume_line(start, config.num_rounds))
    writer = MetricsWriter(workdir, history, write=primary)
    # The round key, made replicated on the mesh (which may span processes).
    round_key = jax.jit(rounds.round_key, static_argnums=0,
                        out_shardings=parallel.replicated(mesh))

    # ---------------------------------------------------------------------------------------------
    # Rounds
    # ---------------------------------------------------------------------------------------------
    last = history[-1] if history else {}
    end = config.num_rounds if stop_after is None else min(config.num_rounds, start + stop_after)
    times = []
    saved = start  # the round of the latest checkpoint
    monitor = health.RoundMonitor(config, float(optax.tree.norm(params)), history, primary=primary,
                                  noise=health.noise_norm(config, privacy, num_params))

    def save(done: int) -> None:
        """Checkpoints the state after `done` rounds."""
        nonlocal saved
        checkpointer.save(done, state, {
            'round': done, 'history': writer.history, 'cum_bytes': cum,
            'privacy': privacy.state_dict(), 'config': config_dict})
        saved = done

    def prepare(r: int) -> PreparedRound | str:
        """Round r's host work (who takes part, the privacy budget check, index arrays, SecAgg
        set-up) with its inputs sent to the device; a message instead if the budget would be
        exceeded."""
        participating = np.zeros(k_pad, bool)
        participating[:num_clients] = sample_participants(config, r, num_clients)
        round_steps = np.where(participating, steps, 0)
        stop_reason = privacy.check_budget(round_steps[:num_clients])
        if stop_reason:
            return stop_reason
        sampler_sizes = np.where(participating, sizes, 0)
        rng_for = lambda k: np.random.default_rng([config.seed, r, HOST_BATCHES, k])
        if lc.sampling == 'poisson':
            batches = batching.poisson_batches(sampler_sizes, lc.batch_size, lc.epochs,
                                               num_steps, max_batch, rng_for)
        else:
            batches = batching.shuffle_batches(sampler_sizes, lc.batch_size, lc.epochs,
                                               num_steps, rng_for)
        weights = aggregation_weights(sizes.astype(np.float32), participating.astype(np.float32))
        secagg_inputs, protocol_up, protocol_down = (), 0, 0
        num_participants = int(participating[:num_clients].sum())
        num_senders = num_participants
        if config.secagg.enabled:
            secagg_inputs, protocol_up, protocol_down = secagg_host.secagg_round(
                config, r, participating, num_clients)
            num_senders = int(np.sum(secagg_inputs.survivor))
        inputs = RoundInputs(
            indices=batches.indices, mask=batches.mask, step_active=batches.step_active,
            weights=weights,
            expected_batch=expected_batch, noise_multiplier=noise_multiplier,
            client_ids=np.arange(k_pad, dtype=np.int32),
            learning_rate=lr_by_round[r], secagg=secagg_inputs)
        inputs = jax.device_put(inputs, parallel.round_inputs_sharding(mesh, inputs))
        return PreparedRound(inputs, round_steps, num_participants, num_senders,
                             batches.overflow, protocol_up, protocol_down)

    # Dispatch is asynchronous: round r+1's host work runs while round r computes, so the device
    # does not wait for index arrays, accounting or SecAgg set-up between rounds.
    upcoming = prepare(start) if start < end else None
    session.in_rounds = True  # from here a first SIGINT / SIGTERM stops after the round
    for r in range(start, end):
        t0 = time.perf_counter()
        current = upcoming
        if isinstance(current, str):  # the budget stop: keep the rounds run since the last save
            say(current)
            if r > saved:
                save(r)
            break
        state, m = round_fn(state, client_data, current.inputs, round_key(config.seed, r))
        privacy.record(current.round_steps[:num_clients])
        upcoming = prepare(r + 1) if r + 1 < end else None
        m = parallel.to_host(m)
        train_loss = float(m['train/loss'])
        monitor.check(r, m)  # not finite: raises, nothing logged or saved (health.py)

        row = {'round': r + 1, 'train/loss': train_loss,
               'train/update_norm': float(m.get('train/update_norm', np.nan)),
               'train/param_norm': float(m['train/param_norm'])}
        row.update(_clipping_diagnostics(m))
        if current.poisson_overflow:
            row['privacy/poisson_overflow'] = current.poisson_overflow
        # -- evaluation -------------------------------------------------------------------------
        if (r + 1) % config.eval_every == 0 or r + 1 == config.num_rounds:
            row.update(_evaluate(task, state.params, eval_global, eval_own, test_global,
                                 hospital_test, hospital_names, local_mode, test_host))
        row.update(privacy.metrics())
        n_up = current.num_participants
        up = (bytes_up + current.protocol_up) if federated else 0
        down = (bytes_down + current.protocol_down) if federated else 0
        # Every participant runs the protocol; a SecAgg dropout never sends its masked update.
        sent_up = up * n_up - (bytes_up * (n_up - current.num_senders) if federated else 0)
        cum = {'up': cum['up'] + sent_up, 'down': cum['down'] + down * n_up}
        row.update({'comm/bytes_up': up, 'comm/bytes_down': down,
                    'comm/cum_bytes_up_per_client': cum['up'] / max(num_clients, 1),
                    'comm/cum_bytes_down_per_client': cum['down'] / max(num_clients, 1),
                    # float32 update size / what a hospital actually sends (payload + protocol)
                    'comm/compression_ratio': 4 * num_params / up if up else None})
        jax.block_until_ready(state)
        row['time/round_s'] = time.perf_counter() - t0
        writer.write(row)
        last = row
        times.append(row['time/round_s'])
        eta = np.mean(times[-5:]) * (config.num_rounds - r - 1)
        main = row.get(f'eval/{task.main_metric}')
        eps = row.get('privacy/epsilon')
        say(f'round {r + 1:4d}/{config.num_rounds} | loss {train_loss:.4f}'
            + (f' | {task.main_metric} {main:.4f}' if main is not None else '')
            + (f' | eps {eps:.3f}' if eps is not None else '')
            + f' | {row["time/round_s"]:.2f} s/round | ETA {_fmt_time(eta)}')
        # -- checkpoint -------------------------------------------------------------------------
        if (r + 1) % config.checkpoint_every == 0 or r + 1 == end:
            save(r + 1)
        if session.stop_requested and r + 1 < end:  # SIGINT / SIGTERM: stop here, saved
            session.stop(done=r + 1, saved=saved, save=save, close=checkpointer.close)
    checkpointer.close()

    # ---------------------------------------------------------------------------------------------
    # Summary
    # ---------------------------------------------------------------------------------------------
    summary = dict(last)
    summary['summary/num_params'] = num_params
    summary['summary/noise_multiplier'] = privacy.noise_multiplier
    summary['summary/num_devices'] = int(mesh.devices.size)
    summary['summary/num_training_clients'] = num_clients
    summary['summary/round_traces'] = round_fn.num_traces
    if isinstance(upcoming, str):  # the loop ended at the privacy budget
        summary['summary/stopped'] = 'privacy budget reached'
    if primary:
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(json_safe(summary), f, indent=2)
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


def _evaluate(task, params, eval_global, eval_own, test_global, hospital_test, names,
              local_mode, test_host) -> dict:
    """eval/<metric> on the global test split (with the task's per-case metrics,
    `Task.split_metrics`, from `test_host`, its labels and metadata, unless that is None:
    config.eval_case_metrics off) and hospital/<name>/<main metric> on each hospital's."""

    def global_metrics(stats):
        out = task.finalize(stats)
        if task.split_metrics is not None and test_host is not None:
            out.update(task.split_metrics(stats, test_host))
        return out

    row = {}
    if local_mode:
        # Each hospital's own model: on the global test split (averaged) and on its own split.
        per = evaluation.split_hospitals(parallel.to_host(eval_global(params, test_global)))[
            : len(names)]
        results = [global_metrics(s) for s in per]
        for key in results[0]:
            row[f'eval/{key}'] = float(np.nanmean([res[key] for res in results]))
    else:
        results = global_metrics(evaluation.unbatch_stats(parallel.to_host(
            eval_global(params, test_global))))
        row.update({f'eval/{k}': v for k, v in results.items()})
    own = evaluation.split_hospitals(parallel.to_host(eval_own(params, hospital_test)))[
        : len(names)]
    own_main = []
    for name, stats in zip(names, own, strict=True):
        value = task.finalize(stats)[task.main_metric]
        row[f'hospital/{name}/{task.main_metric}'] = value
        own_main.append(value)
    row[f'eval/own_{task.main_metric}'] = float(np.nanmean(own_main))
    return row
