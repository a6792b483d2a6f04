"""The server of a deployment, without Flower: the global state, the round plan, the combination
of the hospitals' updates, evaluation, metrics.jsonl and checkpoints.

`Server(config, workdir)` holds what `train.run` holds for the global model and nothing of any
hospital's training data: the initial parameters (`streams.init_key(seed)`, or config.init_from),
the server optimiser's state (`rounds.init_server_state`), the run's aggregation strategy
(`aggregation.registry.strategy_for`, the same FedAvg weighted mean or other aggregator) and
server step (`aggregation.server_opt.server_step`) in one jitted function, the evaluator
(`evaluation.Evaluator` on the global test split only: each hospital's own test split stays at
the hospital), the writers (`writers.create_default_writer`: the same metrics.jsonl and
TensorBoard files) and the Orbax `checkpoint.Checkpointer` of the ServerState and the host
state, so a restarted server resumes after its last checkpoint.

Its test split: with the synthetic twin, the twin's global test split (the server generates the
twin, keeps the test split and drops the rest), which is what `train.run` evaluates on, so the
eval/ entries compare; with a real dataset, the global test split of the dataset in the
server's own data_dir.

Per round: `participants(r)` draws the round's hospitals as the simulation does
(`host_round.sample_participants`); the Flower ServerApp sends them the global parameters and
`finish_round(r, replies)` combines what came back: each reply is a hospital's update, its
number of training examples (the FedAvg weight), its training loss and its own epsilon.

With config.secagg.enabled no update comes back in the clear: the ServerApp runs the protocol of
`deploy/secagg.py` over further message rounds and hands `finish_round` the survivors' weighted
mean (`mean_delta`), to which only the server optimiser step is applied.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedjax_med import checkpoint as ckpt_lib
from fedjax_med import evaluation, host_round, parallel, rounds, streams, writers
from fedjax_med.aggregation import registry, server_opt
from fedjax_med.deploy.common import DeployError, deploy_problems
from fedjax_med.models import build_model
from fedjax_med.state import RoundInputs, ServerState
from fedjax_med.tasks import TASKS
from fedjax_med.validate import validate


class Server:
    """The global side of a deployed run in `workdir` (see the module docstring)."""

    # Long on purpose: what the server holds is built in the order train.run builds it (test
    # split, model, state, evaluator, checkpoints, writers), each step using the ones before.
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate(config)
        problems = deploy_problems(config)
        if problems:
            raise DeployError(problems[0])
        from fedjax_med.data import sources

        self.config, self.workdir = config, workdir
        self.task = TASKS[config.task]
        self.num_hospitals = int(config.data.num_clients)
        self.mesh = parallel.make_mesh(1)
        data = sources.load_federated(config.data, config.seed)
        test = data.test
        del data  # the server keeps the global test split only
        model = build_model(config.model, config.task)
        apply_fn = lambda params, x: model.apply(params, x)
        sample = jnp.zeros((1, *test['image'].shape[1:]), jnp.float32)
        params = jax.jit(model.init)(streams.init_key(config.seed), sample)
        if config.get('init_from'):
            params, _, _ = ckpt_lib.load_params(config.init_from, params)
        self.num_params = evaluation.param_count(params)
        self.initial_norm = float(optax.tree.norm(params))
        self.state = rounds.init_server_state(params, config, 1, self.mesh)
        self.weights = registry.spec(config.server.aggregator).weights
        self.secagg = bool(config.secagg.enabled)
        self._step = None if self.secagg else _server_step_fn(config)
        self._apply = _apply_mean_fn(config) if self.secagg else None
        self.evaluator = evaluation.Evaluator(
            apply_fn=apply_fn,
            task=self.task,
            mesh=self.mesh,
            test=test,
            hospital_tests=[],
            names=[],
            local_mode=False,
            batch_size=config.eval_batch_size,
            case_metrics=bool(config.get('eval_case_metrics', True)),
        )
        os.makedirs(workdir, exist_ok=True)
        self.config_dict = json.loads(config.to_json_best_effort())
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, 'checkpoints'), config.checkpoints_to_keep
        )
        self.start, history, self.cum = 0, [], {'up': 0, 'down': 0}
        latest = self.checkpointer.latest_round()
        if latest is not None:
            diffs = ckpt_lib.config_differences(
                self.checkpointer.restore_host(latest)['config'], self.config_dict
            )
            if diffs:
                raise DeployError(
                    f'workdir {workdir} holds a checkpoint of another run ({diffs[0]}); give '
                    'another workdir, or the same config to resume.'
                )
            self.state, host = self.checkpointer.restore(latest, self.state)
            self.start, history, self.cum = host['round'], host['history'], host['cum_bytes']
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(self.config_dict, f, indent=2, sort_keys=True)
        self.writer = writers.create_default_writer(
            workdir, history, primary=True, tensorboard=config.get('tensorboard', True)
        )
        self.log = []  # what the server was told, e.g. a hospital's refusal

    # -- the plan ------------------------------------------------------------------------------
    def participants(self, r: int) -> list[int]:
        """The hospitals of round r (all of them, or config.clients_per_round drawn)."""
        chosen = host_round.sample_participants(self.config, r, self.num_hospitals)
        return [int(k) for k in np.flatnonzero(chosen)]

    def global_params(self):
        """The global parameters, as numpy arrays (what the hospitals are sent)."""
        return jax.tree.map(np.asarray, self.state.params)

    def note(self, line: str) -> None:
        """Logs a line (printed and kept in `log`, e.g. a hospital's refusal)."""
        self.log.append(line)
        print(f'fedjax_med.deploy: {line}', flush=True)

    def secure_weights(self, replies: dict[int, dict]) -> dict[int, float]:
        """{hospital: its aggregation weight} (config.server.aggregator's host weights of the
        hospitals' example counts), what SecAgg's weighted mean divides by."""
        hospitals = sorted(replies)
        sizes = np.array([replies[k]['num_examples'] for k in hospitals], np.float32)
        weights = self.weights(sizes, np.ones_like(sizes))
        return {k: float(w) for k, w in zip(hospitals, weights, strict=True)}

    # -- combining -----------------------------------------------------------------------------
    # Long on purpose: one round's row is filled in train.run's order (combination, evaluation,
    # privacy, bytes, time) and written and checkpointed at its end.
    def finish_round(
        self,
        r: int,
        replies: dict[int, dict],
        *,
        mean_delta=None,
        bytes_up: int = 0,
        bytes_down: int = 0,
        started: float | None = None,
    ) -> dict:
        """Combines round r's replies {hospital: {'delta', 'num_examples', 'loss_sum',
        'example_count', 'epsilon'}} into the new global state; evaluates, logs and checkpoints
        as `train.run` does. Returns the metrics row. With SecAgg the replies carry no 'delta'
        and `mean_delta` is the unmasked weighted mean of theirs.

        A round in which no hospital answered changes nothing and is not logged.
        """
        config = self.config
        hospitals = sorted(replies)
        if not hospitals:
            raise DeployError(f'round {r + 1}: no hospital sent an update; the round failed.')
        if mean_delta is not None:
            self.state, m = self._apply(self.state, mean_delta)
        else:
            stacked = jax.tree.map(
                lambda *x: np.stack(x), *[replies[k]['delta'] for k in hospitals]
            )
            sizes = np.array([replies[k]['num_examples'] for k in hospitals], np.float32)
            weights = self.weights(sizes, np.ones_like(sizes))
            ids = jnp.asarray(hospitals, jnp.int32)
            self.state, m = self._step(self.state, stacked, weights, ids)
        m = jax.tree.map(float, parallel.to_host(m))
        loss = sum(replies[k]['loss_sum'] for k in hospitals)
        count = sum(replies[k]['example_count'] for k in hospitals)
        row = {
            'round': r + 1,
            'train/loss': loss / max(count, 1.0),
            'train/update_norm': m['train/update_norm'],
            'train/param_norm': m['train/param_norm'],
        }
        if len(hospitals) < self.num_hospitals:
            row['train/participants'] = hospitals
        if (r + 1) % config.eval_every == 0 or r + 1 == config.num_rounds:
            row.update(self.evaluator(self.state.params))
        eps = {k: replies[k].get('epsilon') for k in hospitals}
        if config.dp.mode == 'none':
            row['privacy/epsilon'] = None
        else:
            row['privacy/epsilon'] = max(e for e in eps.values() if e is not None)
            row['privacy/epsilon_per_hospital'] = [eps.get(k) for k in range(self.num_hospitals)]
        # What went over the network this round (message payloads), per hospital taking part.
        n = len(hospitals)
        self.cum = {'up': self.cum['up'] + bytes_up, 'down': self.cum['down'] + bytes_down}
        row.update(
            {
                'comm/bytes_up': bytes_up // n,
                'comm/bytes_down': bytes_down // n,
                'comm/cum_bytes_up_per_client': self.cum['up'] / self.num_hospitals,
                'comm/cum_bytes_down_per_client': self.cum['down'] / self.num_hospitals,
            }
        )
        row['time/round_s'] = time.time() - started if started else 0.0
        self.writer.write_row(row)
        if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.num_rounds:
            self.save(r + 1)
        return row

    def save(self, done: int) -> None:
        """Checkpoints the global state after `done` rounds."""
        self.checkpointer.save(
            done,
            self.state,
            {
                'round': done,
                'history': self.writer.history,
                'cum_bytes': self.cum,
                'privacy': {},
                'config': self.config_dict,
            },
        )

    def close(self) -> dict:
        """Closes the writers and the checkpointer; writes summary.json; returns it."""
        self.checkpointer.close()
        self.writer.close()
        summary = dict(self.writer.history[-1]) if self.writer.history else {}
        summary['summary/num_params'] = self.num_params
        summary['summary/num_training_clients'] = self.num_hospitals
        summary['summary/deployment'] = 'flower'
        if self.log:
            summary['summary/log'] = list(self.log)
        with open(os.path.join(self.workdir, 'summary.json'), 'w') as f:
            json.dump(writers.json_safe(summary), f, indent=2)
        return summary


def _server_step_fn(config: ml_collections.ConfigDict):
    """Jitted `(state, deltas [m, ...], weights [m], hospital ids [m]) -> (state, metrics)`: the
    run's aggregation strategy and server optimiser step, the last part of the simulation's
    round (`rounds.build_round_fn`), over the m hospitals that answered."""
    strategy = registry.strategy_for(
        config, client_noise_multiplier=0.0, expected_clients=1.0, single_device=True
    )
    server = server_opt.server_optimizer(config.server)

    def step(state: ServerState, deltas, weights, ids):
        m = weights.shape[0]
        inputs = RoundInputs(
            indices=jnp.zeros((m, 1, 1), jnp.int32),
            mask=jnp.zeros((m, 1, 1), jnp.float32),
            step_active=jnp.zeros((m, 1), bool),
            weights=weights,
            expected_batch=jnp.ones((m,), jnp.float32),
            noise_multiplier=jnp.zeros((m,), jnp.float32),
            client_ids=ids,
            learning_rate=jnp.zeros((), jnp.float32),
        )
        combined = strategy.combine(deltas, inputs, jax.random.key(0), state.clip_norm)
        return _advance(server, state, combined.mean_delta, combined.clip_norm)

    return jax.jit(step)


def _advance(server, state: ServerState, mean_delta, clip_norm):
    """The server optimiser step from the round's mean update: (new state, metrics)."""
    params, opt_state = server_opt.server_step(server, state.params, state.opt_state, mean_delta)
    metrics = {
        'train/update_norm': optax.tree.norm(mean_delta),
        'train/param_norm': optax.tree.norm(params),
    }
    new_state = ServerState(
        params=params,
        opt_state=opt_state,
        round=state.round + 1,
        clip_norm=clip_norm,
        client_state=state.client_state,
    )
    return new_state, metrics


def _apply_mean_fn(config: ml_collections.ConfigDict):
    """Jitted `(state, mean update) -> (state, metrics)`: the server optimiser step alone, for
    SecAgg, whose weighted mean the server unmasks outside (deploy/secagg.py)."""
    server = server_opt.server_optimizer(config.server)
    return jax.jit(lambda state, mean_delta: _advance(server, state, mean_delta, state.clip_norm))
