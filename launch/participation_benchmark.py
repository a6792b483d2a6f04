"""Does a round cost what its participants compute? Vectorised round time with m of K hospitals
taking part divided by the time with all K, measured on the run's own set-up
(`experiment.build`), rounds of the two settings alternated in one process.

  python launch/participation_benchmark.py                      # K=16 and 64, m=K/4, CPU-sized
  python launch/participation_benchmark.py --cross_device  # + chestxray14.py:cross_device
  python launch/participation_benchmark.py --clients_in_parallel=1   # the one-at-a-time path

The round's client axis holds only the participants (fedjax_med/host_round.py), so the ratio
should be about m/K plus the round's fixed cost (server step, aggregation, dispatch). Before,
the vectorised round trained all K hospitals with the absent ones masked: a ratio of about 1.
Prints one JSON object per setting; BENCHMARKS.md records the results.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` is a folder of the repository, not an installed package

_SETTINGS = flags.DEFINE_list('settings', ['16:4', '64:16'], 'K:m pairs (hospitals, per round).')
_CROSS_DEVICE = flags.DEFINE_bool(
    'cross_device', False, 'Also chestxray14.py:cross_device (1,000 hospitals, 50 a round).'
)
_REPS = flags.DEFINE_integer('reps', 5, 'Timed rounds of each setting (after one to compile).')
_PER_HOSPITAL = flags.DEFINE_integer('examples_per_hospital', 50, 'Training images per hospital.')
_IN_PARALLEL = flags.DEFINE_integer(
    'clients_in_parallel',
    -1,
    'config.clients_in_parallel: -1 = K, every slot vmapped (the vectorised path, also on a CPU, '
    'where 0 means one at a time), 0 = automatic, 1 = one at a time.',
)


def make_config(num_clients: int, per_round: int, variant: str = 'smoke'):
    from configs import chestxray14

    c = chestxray14.get_config(variant)
    if variant == 'smoke':
        c.data.num_clients = num_clients
        c.data.partition = 'iid'
        c.data.num_train = num_clients * _PER_HOSPITAL.value
        c.data.num_test = max(160, num_clients * 5)
        c.local.batch_size = 10
        c.local.epochs = 1.0
        c.num_rounds = _REPS.value + 1
    c.clients_per_round = 0 if per_round >= c.data.num_clients else per_round
    c.clients_in_parallel = c.data.num_clients if _IN_PARALLEL.value < 0 else _IN_PARALLEL.value
    return c


def measure(exps: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per round of each experiment, alternating them round by round (the first,
    compiling, round of each is left out)."""
    import jax

    states = {name: exp.state for name, exp in exps.items()}
    times = {name: [] for name in exps}
    compile_s = {}
    for r in range(reps + 1):
        for name, exp in exps.items():
            prepared = exp.planner.prepare(r)
            key = exp.round_key(exp.config.seed, r)
            jax.block_until_ready(prepared.inputs)
            t0 = time.perf_counter()
            states[name], metrics = exp.round_fn(
                states[name], exp.client_data, prepared.inputs, key
            )
            jax.block_until_ready((states[name], metrics))
            (times[name] if r else compile_s.setdefault(name, [])).append(time.perf_counter() - t0)
    return {
        'round_s': times,
        'first_round_s': {k: v[0] for k, v in compile_s.items()},
        'traces': {name: exp.round_fn.num_traces for name, exp in exps.items()},
    }


def run_setting(label: str, all_config, part_config) -> dict:
    import jax

    from fedjax_med import experiment, parallel

    mesh = parallel.make_mesh()
    from fedjax_med.data import sources

    data = sources.load_federated(all_config.data, all_config.seed)
    exps = {
        'all': experiment.build(all_config, mesh, data=data),
        'participants': experiment.build(part_config, mesh, data=data),
    }
    result = measure(exps, _REPS.value)
    med = {k: statistics.median(v) for k, v in result['round_s'].items()}
    k, m = all_config.data.num_clients, part_config.clients_per_round
    return {
        'setting': label,
        'K': k,
        'm': m,
        'device': str(jax.devices()[0].device_kind),
        'num_devices': int(mesh.devices.size),
        'clients_in_parallel': all_config.clients_in_parallel,
        'slots': {name: int(exp.planner.num_slots) for name, exp in exps.items()},
        'round_s_median': med,
        'round_s': result['round_s'],
        'first_round_s': result['first_round_s'],
        'round_traces': result['traces'],
        'ratio_participants_to_all': med['participants'] / med['all'],
        'm_over_K': m / k,
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    for setting in _SETTINGS.value:
        k, m = (int(x) for x in setting.split(':'))
        print(
            json.dumps(run_setting(f'smoke K={k} m={m}', make_config(k, k), make_config(k, m))),
            flush=True,
        )
    if _CROSS_DEVICE.value:
        print(
            json.dumps(
                run_setting(
                    'cross_device',
                    make_config(1000, 1000, 'cross_device'),
                    make_config(1000, 50, 'cross_device'),
                )
            ),
            flush=True,
        )


if __name__ == '__main__':
    app.run(main)
