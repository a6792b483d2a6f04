"""fedjax_med against the stack users would pick instead, on one workload, in one process.

  pip install -e '.[peers]'                        # torch, opacus, flwr[simulation] (Ray)
  python launch/peer_benchmark.py --json=/tmp/peers.json             # a few minutes on 2 cores
  python launch/peer_benchmark.py --rounds=1 --local_epochs=0.1      # a quick correctness pass
  python launch/peer_benchmark.py --config=configs/chestxray14.py:synthetic --config.model.width=16

Systems (the same hospitals, the same initial parameters, the same local steps, Adam at the same
learning rate, example-weighted FedAvg):
  fedjax_med          the run's jitted round (`experiment.build`, `planner.prepare(r)`, `round_fn`)
  pytorch             a plain PyTorch loop over the hospitals (torch.set_num_threads), FedAvg by
                      hand, on the very batches fedjax_med's planner drew for the round
  flower              Flower's simulation (`flwr.simulation.run_simulation`, Ray backend) with
                      a ServerApp running Flower's FedAvg and a ClientApp training the PyTorch twin
  fedjax_med_dp       fedjax_med with sample-level DP-SGD (Poisson sampling, per-example clip C,
                      noise sigma_k calibrated by its privacy plan)
  opacus              the PyTorch loop with Opacus DP-SGD (`PrivacyEngine.make_private`,
                      poisson_sampling=True, the same C, sigma_k and q = B / n_k)
  flower_opacus       Flower's simulation with Opacus inside the ClientApp

Two phases, non-private (fedjax_med, pytorch, flower) then DP (fedjax_med_dp, opacus,
flower_opacus). Within a phase each system first sets up and runs its first round (timed
together: time to the first finished round), then the systems alternate round by round: Flower's
strategy runs the other systems' round r before configuring its own (peer_torch.make_server_app).
The model is fedjax_med's GroupNorm ResNet and its PyTorch twin (launch/peer_torch.py), checked
at start: same parameter count, same logits on the initial parameters, and after the first
round the same parameters (same batches, same Adam) up to float32 rounding.

Reported (JSON on stdout and at --json): per system the median seconds per round (first round
left out), examples/s, the first round's time from the start of that system's set-up, and the
ratios fedjax_med examples/s / peer examples/s; for fedjax_med the first round with a cold (empty)
and a warm persistent compilation cache (`parallel.enable_compilation_cache`, the same program
built again later in this process). BENCHMARKS.md records the results.

torch, opacus and flwr are optional (the `peers` extra); without them this exits with status 2.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not an installed package

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when the script runs, so that importing it (the
    tests) defines nothing in absl's global flags, which other modules share."""
    config_flags.DEFINE_config_file(
        'config',
        os.path.join(REPO, 'configs', 'chestxray14.py') + ':synthetic',
        'Workload (a resnet18 / resnet_small config); --config.FIELD=VALUE overrides.',
        lock_config=False,
    )
    flags.DEFINE_float('local_epochs', 0.5, 'config.local.epochs of every system.')
    flags.DEFINE_integer('rounds', 3, 'Timed rounds per system (after the first one).')
    flags.DEFINE_integer('threads', 2, 'torch.set_num_threads (driver and Ray workers).')
    flags.DEFINE_bool('dp', True, 'Also the DP phase (fedjax_med_dp, opacus, flower_opacus).')
    flags.DEFINE_bool('flower', True, "Include Flower's simulation (needs Ray).")
    flags.DEFINE_float(
        'dp_clip_norm',
        None,
        "DP-SGD clip C (default: the config's when dp.mode=sample, else 0.03).",
    )
    flags.DEFINE_float(
        'dp_target_epsilon',
        3.0,
        'Target epsilon the privacy plan calibrates sigma_k to (unless the config already has '
        'dp.mode=sample).',
    )
    flags.DEFINE_string(
        'onednn_max_cpu_isa',
        'AVX2',
        'ONEDNN_MAX_CPU_ISA for torch (set before torch is imported; Ray workers inherit it). '
        "torch 2.14.1's oneDNN 3.12 AVX-512 kernel of the 1x1 convolution's weight gradient "
        "crashed (SIGSEGV) on an AVX-512 AMD EPYC for a batch of 7; '' keeps torch's default.",
    )
    flags.DEFINE_string('json', None, 'Also write the JSON report to this file.')


OURS = 'fedjax_med'
PHASES = {
    'nondp': ('fedjax_med', 'pytorch', 'flower'),
    'dp': ('fedjax_med_dp', 'opacus', 'flower_opacus'),
}
PEER_PACKAGES = ('torch', 'opacus', 'flwr')


# ---------------------------------------------------------------------------------------------
# Pure helpers (no torch, no JAX): tested in tests/test_peer_benchmark.py
# ---------------------------------------------------------------------------------------------


def twin_architecture(model_config, num_outputs: int, in_channels: int) -> dict:
    """The ResNet `fedjax_med.models.build_model` builds for `model_config`, as keyword arguments
    of peer_torch.TwinResNet."""
    if model_config.name == 'resnet18':
        stages, width, stem_stride = (2, 2, 2, 2), 64, 2
    elif model_config.name == 'resnet_small':
        stages, width, stem_stride = (1,) * model_config.depth, model_config.width, 1
    else:
        raise ValueError(
            f'peer_benchmark compares ResNets only (resnet18, resnet_small), not '
            f'{model_config.name!r}.'
        )
    return {
        'stage_sizes': list(stages),
        'width': int(width),
        'num_outputs': int(num_outputs),
        'norm_groups': int(model_config.norm_groups),
        'stem_stride': stem_stride,
        'in_channels': int(in_channels),
        'negative_slope': float(model_config.negative_slope),
    }


def twin_param_count(arch: dict) -> int:
    """Parameters of fedjax_med's ResNet (and so of its twin): bias-free convolutions, a scale
    and a bias per GroupNorm channel, a dense head with bias."""
    width, cin = arch['width'], arch['in_channels']
    kernel = 7 if arch['stem_stride'] > 1 else 3
    total = kernel * kernel * cin * width + 2 * width  # stem + its GroupNorm
    cin = width
    for i, blocks in enumerate(arch['stage_sizes']):
        features = width * 2**i
        for j in range(blocks):
            strides = 2 if i > 0 and j == 0 else 1
            total += 9 * cin * features + 2 * features  # conv1 + GroupNorm_0
            total += 9 * features * features + 2 * features  # conv2 + GroupNorm_2
            if cin != features or strides != 1:
                total += cin * features + 2 * features  # proj (1x1) + GroupNorm_3
            cin = features
    return total + cin * arch['num_outputs'] + arch['num_outputs']


def summarize(systems: dict, ours: str) -> dict:
    """Per system: median seconds per round, examples/s and the first round; and the ratios
    ours / peer of examples/s (> 1: ours is faster).

    Args:
      systems: {name: {'round_s': [timed rounds, first excluded], 'examples_per_round': float,
        'first_round_s': float or None, ...}}; a system with no timed rounds (it did not run)
        is reported with nulls and gets no ratio.
      ours: the fedjax_med system of the phase.
    """
    out = {}
    for name, s in systems.items():
        rounds = list(s.get('round_s') or [])
        median = statistics.median(rounds) if rounds else None
        out[name] = {
            **s,
            'round_s': rounds,
            'median_round_s': median,
            'examples_per_s': s['examples_per_round'] / median if median else None,
        }
    ratios = {}
    mine = out[ours]['examples_per_s']
    for name, s in out.items():
        if name != ours and mine and s['examples_per_s']:
            ratios[f'{ours}_over_{name}'] = mine / s['examples_per_s']
    return {'systems': out, 'ratios': ratios}


def missing_packages(names: Sequence[str] = PEER_PACKAGES) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _configs(base, epochs: float, rounds: int):
    """(non-private config, DP config) of the workload."""
    nondp = base.copy_and_resolve_references()
    nondp.num_rounds = rounds + 1
    nondp.local.epochs = epochs
    nondp.local.sampling = 'shuffle'
    nondp.dp.mode = 'none'
    dp = nondp.copy_and_resolve_references()
    dp.local.sampling = 'poisson'
    if base.dp.mode != 'sample':  # chestxray14.py:dp's DP-SGD settings
        dp.dp.mode = 'sample'
        dp.dp.clip_norm = 0.03
        dp.dp.target_epsilon = FLAGS.dp_target_epsilon
        dp.dp.chunk_size = dp.dp.chunk_size or 8
    if FLAGS.dp_clip_norm is not None:
        dp.dp.clip_norm = FLAGS.dp_clip_norm
    for c in (nondp, dp):
        c.mode = 'federated'
        c.clients_per_round = 0
        c.secagg.enabled = False
        c.compression.kind = 'none'
        c.server.optimizer, c.server.learning_rate, c.server.aggregator = 'fedavg', 1.0, 'weighted'
        c.local.optimizer, c.local.prox_mu = 'adam', 0.0
    return nondp, dp


class FedjaxSystem:
    """fedjax_med's round as launch/participation_benchmark.py times it: the planner's host
    inputs prepared (and timed apart) before the clock starts, then `round_fn` to completion."""

    def __init__(self, config, mesh, data):
        import jax

        from fedjax_med import experiment

        self.jax = jax
        self.exp = experiment.build(config, mesh, data=data)
        self.state = self.exp.state
        self.prepare_s, self.prepared = [], None

    def prepare(self, r: int):
        t0 = time.perf_counter()
        prepared = self.exp.planner.prepare(r)
        if isinstance(prepared, str):
            raise RuntimeError(prepared)
        self.jax.block_until_ready(prepared.inputs)
        self.prepare_s.append(time.perf_counter() - t0)
        self.prepared = prepared
        return prepared

    def round(self, r: int) -> float:
        exp, prepared = self.exp, self.prepared
        key = exp.round_key(exp.config.seed, r)
        self.jax.block_until_ready(key)
        t0 = time.perf_counter()
        self.state, metrics = exp.round_fn(self.state, exp.client_data, prepared.inputs, key)
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


def _flat(tree) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(tree['params'])[0]
    # Copies: a zero-copy view of a device buffer must not outlive it (rounds donate their state).
    return {tuple(k.key for k in path): np.array(v, copy=True) for path, v in leaves}


def _max_abs_diff(a: dict, b: dict) -> float:
    import numpy as np

    return float(max(np.max(np.abs(a[k] - b[k])) for k in a))


def _expected_examples(exp, dp: bool) -> float:
    """Real training examples of one round over all hospitals (DP: expected, steps_k * B)."""
    k, lc = exp.num_clients, exp.config.local
    sizes, steps = [int(n) for n in exp.sizes[:k]], [int(s) for s in exp.steps[:k]]
    if dp:
        return float(sum(s * min(lc.batch_size, n) for s, n in zip(steps, sizes, strict=True)))
    return float(sum(round(lc.epochs * n) for n in sizes))


def _flower_settings(exp, arch, data_path, dp_settings) -> dict:
    from fedjax_med import streams

    k = exp.num_clients
    return {
        'arch': arch,
        'data_path': data_path,
        'threads': FLAGS.threads,
        'seed': int(exp.config.seed),
        'host_batches_stream': int(streams.HOST_BATCHES),
        'batch_size': int(exp.config.local.batch_size),
        'epochs': float(exp.config.local.epochs),
        'steps': [int(s) for s in exp.steps[:k]],
        'dp': dp_settings,
    }


def _run_flower(pt, settings, init_state, exp, lr_of_round, between_rounds, notes) -> dict:
    """Flower's simulation for 1 + rounds rounds; returns its timings (or the reason it failed)."""
    import logging

    from flwr.simulation import run_simulation

    try:
        from flwr.common.logger import FLOWER_LOGGER

        FLOWER_LOGGER.setLevel(logging.WARNING)
    except ImportError:
        pass
    record: dict = {}

    def between(r):
        try:
            between_rounds(r)
        except BaseException as e:  # the ServerApp thread would only log it
            record.setdefault('exception', e)
            raise

    k = exp.num_clients
    server = pt.make_server_app(init_state, FLAGS.rounds + 1, k, lr_of_round, between, record)
    client = pt.make_client_app(settings)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=k,
        backend_config={
            'client_resources': {'num_cpus': FLAGS.threads, 'num_gpus': 0.0},
            'init_args': {
                'num_cpus': FLAGS.threads,
                'include_dashboard': False,
                'logging_level': logging.ERROR,
                'log_to_driver': False,
            },
        },
    )
    if 'exception' in record:
        raise record['exception']
    ends, starts = record.get('round_end', {}), record.get('round_start', {})
    errors = [e for errs in record.get('errors', {}).values() for e in errs]
    if errors:
        notes.append(f'Flower ClientApp errors: {errors[:3]}')
    if 1 not in ends:
        notes.append('Flower simulation finished no round (see its log above).')
        return {'round_s': [], 'first_round_s': None, 'completed_rounds': 0}
    return {
        'first_round_s': ends[1] - t0,
        'round_s': [ends[s] - starts[s] for s in sorted(ends) if s >= 2],
        'completed_rounds': len(ends),
        'examples_seen_per_round': [record['examples'][s] for s in sorted(record['examples'])],
        'final_state': record.get('final'),
    }


# Long on purpose: one phase is a straight sequence (set-up and first round of each system,
# then the alternating rounds, then the checks), and splitting it would scatter the timers.
def run_phase(phase, config, mesh, data, pt, arch, data_path, notes) -> dict:
    """One phase: fedjax_med, the PyTorch loop and Flower, all from the same initial parameters."""
    import numpy as np
    import torch

    from fedjax_med import host_round

    dp = phase == 'dp'
    ours, plain, flower = PHASES[phase]
    systems = {name: {'round_s': []} for name in PHASES[phase]}
    lr_of_round = host_round.lr_schedule(config.local, config.num_rounds)

    # fedjax_med: set-up (build: data on the device, model, plan, jitted round) + first round.
    t0 = time.perf_counter()
    fj = FedjaxSystem(config, mesh, data)
    build_s = time.perf_counter() - t0
    fj.prepare(0)
    fj.round(0)
    systems[ours].update(first_round_s=time.perf_counter() - t0, build_s=build_s)
    exp = fj.exp
    k = exp.num_clients
    weights = exp.sizes[:k] / exp.sizes[:k].sum()
    init_flat = _flat(exp.params)
    init_state = pt.flax_to_state_dict(init_flat)
    dp_settings = None
    if dp:
        dp_settings = {
            'noise_multipliers': [float(z) for z in exp.privacy.noise_multipliers],
            'clip_norm': float(config.dp.clip_norm),
            'batch_size': int(config.local.batch_size),
        }
    examples = _expected_examples(exp, dp)
    for name in systems:
        systems[name]['examples_per_round'] = examples

    # PyTorch loop: set-up (twin, tensors, Opacus's make_private) + first round.
    t0 = time.perf_counter()
    fed = pt.PlainFederation(
        arch, exp.data.clients_train, init_state, weights, dp=dp_settings, seed=int(config.seed)
    )

    def plain_round(r: int) -> float:
        start = time.perf_counter()
        if dp:
            fed.round(float(lr_of_round(r)), steps=exp.steps[:k])
        else:
            inputs = fj.prepared.inputs  # the batches fedjax_med's planner drew for round r
            active = np.array(inputs.step_active)[:k, :, None]
            fed.round(
                float(lr_of_round(r)),
                indices=np.array(inputs.indices)[:k],
                mask=np.array(inputs.mask)[:k] * active,
            )
        return time.perf_counter() - start

    plain_round(0)
    systems[plain]['first_round_s'] = time.perf_counter() - t0
    checks = {}
    if not dp:  # same start, same batches, same Adam: the same model up to float32 rounding
        after_fj = _flat(fj.state.params)
        after_pt = pt.state_dict_to_flax(fed.model.state_dict(), after_fj)
        moved = _max_abs_diff(after_fj, init_flat)
        checks['round0_param_max_abs_diff'] = _max_abs_diff(after_fj, after_pt)
        checks['round0_param_max_abs_change'] = moved

    def between_rounds(r: int) -> None:
        fj.prepare(r)
        systems[ours]['round_s'].append(fj.round(r))
        systems[plain]['round_s'].append(plain_round(r))

    flower_done = 0
    if FLAGS.flower and 'ray' not in missing_packages(('ray',)):
        settings = _flower_settings(exp, arch, data_path, dp_settings)
        try:
            result = _run_flower(pt, settings, init_state, exp, lr_of_round, between_rounds, notes)
        except Exception as e:  # noqa: BLE001 - reported, the other systems go on
            notes.append(f'{flower}: simulation failed: {type(e).__name__}: {e}')
            result = {'round_s': [], 'first_round_s': None, 'completed_rounds': 0}
        final = result.pop('final_state', None)
        flower_done = result.get('completed_rounds', 0)
        systems[flower].update(result)
        if final is not None and not dp:
            # Flower's FedAvg of the same twin on the same batches: the PyTorch loop's model.
            diff = max(float((final[n] - v).abs().max()) for n, v in fed.model.state_dict().items())
            checks['flower_vs_pytorch_final_max_abs_diff'] = diff
    elif FLAGS.flower:
        notes.append(
            f'{flower}: not run: flwr.simulation.run_simulation needs Ray (pip install '
            "'flwr[simulation]'), which is not installed."
        )
    for r in range(max(1, flower_done), FLAGS.rounds + 1):  # without Flower: the two alternate
        between_rounds(r)
    if not FLAGS.flower or not systems[flower]['round_s']:
        systems[flower].setdefault('first_round_s', None)
    systems[ours]['host_prepare_s_median'] = statistics.median(fj.prepare_s)
    if dp:
        systems[ours]['noise_multipliers'] = dp_settings['noise_multipliers']
        systems[ours]['clip_norm'] = dp_settings['clip_norm']
    out = summarize(systems, ours)
    out['checks'] = checks
    out['torch_threads'] = torch.get_num_threads()
    out['local_steps'] = [int(s) for s in exp.steps[:k]]
    return out


def _write_data(data, path: str) -> None:
    import numpy as np

    arrays = {}
    for k, s in enumerate(data.clients_train):
        arrays[f'image_{k}'], arrays[f'label_{k}'] = s['image'], s['label']
    np.savez(path, **arrays)


# Long on purpose: the driver is one sequence (imports timed, the cold cache, data, the twin's
# checks, the two phases, the warm cache, the report).
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    missing = missing_packages()
    if missing:
        print(
            f'peer_benchmark needs {", ".join(missing)} (not installed): '
            "pip install -e '.[peers]'  (torch, opacus, flwr[simulation])",
            file=sys.stderr,
        )
        sys.exit(2)
    import tempfile

    started = time.strftime('%Y-%m-%d %H:%M:%S')
    load_before = os.getloadavg()
    import_s = {}
    if FLAGS.onednn_max_cpu_isa and 'ONEDNN_MAX_CPU_ISA' not in os.environ:
        os.environ['ONEDNN_MAX_CPU_ISA'] = FLAGS.onednn_max_cpu_isa
    t0 = time.perf_counter()
    import torch

    import_s['torch'] = time.perf_counter() - t0
    torch.set_num_threads(FLAGS.threads)
    t0 = time.perf_counter()
    import opacus

    import_s['opacus'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    import flwr

    import_s['flwr'] = time.perf_counter() - t0
    notes = []
    # A fresh persistent compilation cache: the first build compiles cold.
    if os.environ.pop('JAX_COMPILATION_CACHE_DIR', None):
        notes.append('JAX_COMPILATION_CACHE_DIR was set; a fresh cache folder was used instead.')
    tmp = tempfile.mkdtemp(prefix='peer_benchmark_')
    t0 = time.perf_counter()
    import jax

    from fedjax_med import parallel, validate
    from fedjax_med.data import sources

    import_s['jax+fedjax_med'] = time.perf_counter() - t0
    cache_dir = parallel.enable_compilation_cache(os.path.join(tmp, 'jax_cache'))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import peer_torch as pt  # torch side; Ray workers import it by name too

    nondp_config, dp_config = _configs(FLAGS.config, FLAGS.local_epochs, FLAGS.rounds)
    for c in (nondp_config, dp_config):
        validate.validate(c)
    mesh = parallel.make_mesh(num_devices=1)  # torch uses one CPU process too
    t0 = time.perf_counter()
    data = sources.load_federated(nondp_config.data, nondp_config.seed)
    data_load_s = time.perf_counter() - t0
    first = data.clients_train[0]
    from fedjax_med.models import NUM_OUTPUTS

    arch = twin_architecture(
        nondp_config.model, NUM_OUTPUTS[nondp_config.task], first['image'].shape[-1]
    )
    data_path = os.path.join(tmp, 'hospitals.npz')
    _write_data(data, data_path)

    # The twin: same parameter count (formula, flax, torch) and same logits on the same weights.
    from fedjax_med import streams
    from fedjax_med.data import storage
    from fedjax_med.models import build_model

    model = build_model(nondp_config.model, nondp_config.task)
    params = jax.jit(model.init)(streams.init_key(nondp_config.seed), first['image'][:1] * 0.0)
    twin = pt.build_twin(arch)
    counts = {
        'fedjax_med': int(sum(x.size for x in jax.tree.leaves(params))),
        'pytorch_twin': pt.num_params(twin),
        'formula': twin_param_count(arch),
    }
    print(f'parameters: {counts}', flush=True)
    assert len(set(counts.values())) == 1, f'the twin is not the same model: {counts}'
    twin.load_state_dict(pt.flax_to_state_dict(_flat(params)))
    batch = storage.decode({'image': first['image'][:16], 'label': first['label'][:16]})
    with torch.no_grad():
        torch_logits = twin(torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy())).numpy()
    jax_logits = jax.device_get(model.apply(params, batch['image']))
    logits_diff = float(abs(torch_logits - jax_logits).max())
    print(f'twin logits max |diff| on 16 images: {logits_diff:.2e}', flush=True)
    assert logits_diff < 1e-4, f'the twin computes something else: {logits_diff}'

    report = {
        'date': started,
        'device': str(jax.devices()[0].device_kind),
        'platform': jax.default_backend(),
        'cpu_count': os.cpu_count(),
        'load_average_before': [round(x, 2) for x in load_before],
        'versions': {
            'jax': jax.__version__,
            'torch': torch.__version__,
            'opacus': opacus.__version__,
            'flwr': flwr.__version__,
            'ray': _version('ray'),
        },
        'import_s': import_s,
        'onednn_max_cpu_isa': os.environ.get('ONEDNN_MAX_CPU_ISA'),
        'workload': {
            'config': FLAGS['config'].config_filename,
            'model': nondp_config.model.name,
            'arch': arch,
            'parameters': counts,
            'hospitals': int(len(data.clients_train)),
            'examples_per_hospital': [int(len(s['image'])) for s in data.clients_train],
            'batch_size': int(nondp_config.local.batch_size),
            'local_epochs': float(nondp_config.local.epochs),
            'timed_rounds': FLAGS.rounds,
            'resolution': int(first['image'].shape[1]),
            'data_load_s': data_load_s,
        },
        'checks': {'twin_logits_max_abs_diff': logits_diff},
        'notes': notes,
    }
    phases = [('nondp', nondp_config)] + ([('dp', dp_config)] if FLAGS.dp else [])
    for phase, config in phases:
        print(f'--- phase {phase}', flush=True)
        report[phase] = run_phase(phase, config, mesh, data, pt, arch, data_path, notes)
        report['workload'][f'{phase}_local_steps'] = report[phase].pop('local_steps')
        print(json.dumps({phase: report[phase]['ratios']}), flush=True)

    # The same fedjax_med program built again: its first round with a warm compilation cache.
    t0 = time.perf_counter()
    again = FedjaxSystem(nondp_config, mesh, data)
    again.prepare(0)
    again.round(0)
    report['compilation_cache'] = {
        'dir': cache_dir,
        'fedjax_med_first_round_cold_s': report['nondp']['systems']['fedjax_med']['first_round_s'],
        'fedjax_med_first_round_warm_s': time.perf_counter() - t0,
        'how': 'cold: the first build in this process with an empty cache folder; warm: the same '
        'config built again at the end (tracing and lowering run again, the compiled programs '
        'are read from the cache)',
    }
    report['load_average_after'] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=1, default=float)
    print(text, flush=True)
    if FLAGS.json:
        with open(FLAGS.json, 'w') as f:
            f.write(text + '\n')


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == '__main__':
    define_flags()
    app.run(main)
