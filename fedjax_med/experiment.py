"""An experiment: everything a run is made of, built once from its config.

`build(config, mesh)` loads the federation, puts the training data on the devices, builds the
model and its initial server state, the privacy plan, the jitted round, the round planner (the
host half of each round) and the evaluator. `train.run` is the loop over rounds on top of it
(and through it `launch/profile_rounds.py` and the notebooks); `launch/participation_benchmark.py`
and the tests build through this function directly, so what they measure is the run's set-up.

    exp = experiment.build(config, parallel.make_mesh())
    prepared = exp.planner.prepare(0)
    state, metrics = exp.round_fn(exp.state, exp.client_data, prepared.inputs,
                                  exp.round_key(config.seed, 0))
    row = exp.evaluator(state.params)
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fedjax_med import attacks, comm, evaluation, host_round, parallel, rounds, streams
from fedjax_med import auditor as auditor_lib
from fedjax_med import checkpoint as ckpt_lib
from fedjax_med.aggregation import compression, registry
from fedjax_med.data import batching
from fedjax_med.data import canaries as canaries_lib
from fedjax_med.models import build_model
from fedjax_med.state import ServerState
from fedjax_med.tasks import TASKS, Task
from fedjax_med.validate import ConfigError


@dataclasses.dataclass
class Experiment:
    """A built run (see the module docstring). Arrays of the client axis have K_pad rows: the
    K training hospitals, then padding up to a multiple of the device count."""

    config: ml_collections.ConfigDict
    task: Task
    mesh: Any
    data: Any  # data.sources.FederatedDataset
    hospital_names: list[str]  # the hospitals' names (per-hospital metrics)
    num_clients: int  # K training clients (1 for the centralised baseline)
    sizes: np.ndarray  # [K_pad] training examples of each client (0: padding)
    steps: np.ndarray  # [K_pad] local steps per round
    client_data: dict  # {'image', 'label'}: [K_pad, n_max, ...] on the mesh
    model: Any
    apply_fn: Any  # (params, images) -> logits
    params: Any  # initial parameters (after a warm start, if any)
    init_source: tuple | None  # (workdir, round) of a warm start, else None
    num_params: int
    privacy: Any  # privacy.plan.PrivacyPlan
    compressor: Any  # aggregation.compression.Compressor or None
    round_fn: rounds.RoundFn
    state: ServerState  # the initial server state, placed on the mesh
    planner: host_round.RoundPlanner
    evaluator: evaluation.Evaluator
    bytes_down: int  # model payload per participating hospital and round
    bytes_up: int
    # The round key, made replicated on the mesh (which may span processes).
    round_key: Any = None
    # config.audit: the planted canaries (data.canaries.Canaries) and their auditor
    # (auditor.CanaryAuditor), None without an audit. `data.clients_train` holds the planted
    # canaries; `canaries.num_real` says how many rows of their hospital are its own.
    canaries: Any = None
    auditor: Any = None

    @property
    def federated(self) -> bool:
        return self.config.mode == 'federated'


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


def training_splits(config: ml_collections.ConfigDict, data) -> list[dict]:
    """The training clients of the run: the hospitals, or one pooled client (centralised), or
    the public set (pretraining, `data.train_on='public'`)."""
    if config.data.get('train_on', 'hospitals') == 'public':
        return [pool_clients([data.public])]
    if config.mode == 'centralized':
        return [pool_clients(data.clients_train)]
    return data.clients_train


# Long on purpose: the build is a straight sequence, each piece built once from the ones
# before it (data -> canaries -> model -> privacy plan -> round -> planner -> evaluator ->
# auditor).
def build(
    config: ml_collections.ConfigDict, mesh=None, *, warm_start: bool = True, data=None
) -> Experiment:
    """Builds the run `config` describes on `mesh` (default: all devices).

    Args:
      config: a validated config.
      mesh: from `parallel.make_mesh`.
      warm_start: apply `config.init_from` (a resumed run restores its own parameters instead).
      data: the federation, if already loaded (`data.sources.load_federated`).
    Raises:
      validate.ConfigError: a privacy target these hospitals cannot meet.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    task = TASKS[config.task]
    if data is None:
        from fedjax_med.data import sources  # TFDS: only once the config is valid

        data = sources.load_federated(config.data, config.seed)
    canaries = None
    if canaries_lib.enabled(config):  # before anything counts the hospitals' examples
        canaries = canaries_lib.make_canaries(config.audit, data.clients_train, config.seed)
        data = dataclasses.replace(
            data, clients_train=canaries_lib.plant(data.clients_train, canaries)
        )
    splits = training_splits(config, data)
    num_clients = len(splits)
    k_pad = parallel.padded_num_clients(num_clients, mesh)
    sizes = np.array([len(s['image']) for s in splits] + [0] * (k_pad - num_clients))
    client_data = parallel.put_clients(pad_examples(splits, k_pad), mesh)
    logging.info(
        'Hospitals: %s; training examples per training client: %s; test: %d',
        list(data.client_names),
        sizes[:num_clients].tolist(),
        len(data.test['image']),
    )

    model = build_model(config.model, config.task)
    apply_fn = lambda params, x: model.apply(params, x)
    params, init_source = _initial_params(config, model, splits, warm_start)
    num_params = evaluation.param_count(params)

    lc = config.local
    steps = np.array(
        [batching.steps_per_round(n, lc.batch_size, lc.epochs) if n else 0 for n in sizes]
    )
    from fedjax_med.privacy import plan  # dp-accounting: only once the config is valid

    try:
        privacy = plan.PrivacyPlan(config, sizes[:num_clients], steps[:num_clients])
    except ValueError as e:  # a privacy target these hospitals cannot meet: the user's to fix
        raise ConfigError([str(e)]) from None

    federated = config.mode == 'federated'
    compressor = compression.make_compressor(config.compression) if federated else None
    round_fn = rounds.build_round_fn(
        apply_fn=apply_fn,
        task=task,
        config=config,
        mesh=mesh,
        client_noise_multiplier=privacy.noise_multiplier,
        expected_clients=privacy.expected_clients,
        compressor=compressor,
        model=model,
    )
    bytes_down, bytes_up = comm.round_bytes(params, config) if federated else (0, 0)
    state = rounds.init_server_state(params, config, k_pad, mesh, compressor)
    planner = host_round.RoundPlanner(
        config,
        sizes=sizes,
        steps=steps,
        num_clients=num_clients,
        privacy=privacy,
        weights=registry.spec(config.server.aggregator).weights,
        mesh=mesh,
    )
    evaluator = evaluation.Evaluator(
        apply_fn=apply_fn,
        task=task,
        mesh=mesh,
        test=data.test,
        hospital_tests=data.clients_test,
        names=list(data.client_names),
        local_mode=config.mode == 'local',
        batch_size=config.eval_batch_size,
        case_metrics=bool(config.get('eval_case_metrics', True)),
        backdoor=(
            (attacks.target_index(config), int(config.attack.trigger_size))
            if attacks.enabled(config) and config.attack.mode == 'backdoor'
            else None
        ),
    )
    round_key = jax.jit(
        streams.round_key, static_argnums=0, out_shardings=parallel.replicated(mesh)
    )
    canary_auditor = None
    if canaries is not None:
        canary_auditor = auditor_lib.CanaryAuditor(
            config=config,
            canaries=canaries,
            apply_fn=apply_fn,
            task=task,
            mesh=mesh,
            privacy=privacy,
            sizes=sizes,
        )
    return Experiment(
        config=config,
        task=task,
        mesh=mesh,
        data=data,
        hospital_names=list(data.client_names),
        num_clients=num_clients,
        sizes=sizes,
        steps=steps,
        client_data=client_data,
        model=model,
        apply_fn=apply_fn,
        params=params,
        init_source=init_source,
        num_params=num_params,
        privacy=privacy,
        compressor=compressor,
        round_fn=round_fn,
        state=state,
        planner=planner,
        evaluator=evaluator,
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        round_key=round_key,
        canaries=canaries,
        auditor=canary_auditor,
    )


def _initial_params(config, model, splits, warm_start: bool):
    """The model's initial parameters and, after a warm start, (source, its round)."""
    sample_image = jnp.zeros((1, *splits[0]['image'].shape[1:]), jnp.float32)
    # One jitted program instead of one small compilation per layer op (and, with the
    # persistent compilation cache, nothing to compile on a rerun); the values are identical.
    params = jax.jit(model.init)(streams.init_key(config.seed), sample_image)
    if config.get('init_from') and warm_start:
        params, source_round, _ = ckpt_lib.load_params(config.init_from, params)
        return params, (config.init_from, source_round)
    return params, None
