"""The golden runs: small configs covering every path of the round and the loop, whose
metrics.jsonl (without timing keys) is recorded in tests/goldens/ and must not change when the
code is restructured (tests/test_golden_*.py).

Record again only when a change of behaviour is intended, and say so in the commit:
    FEDJAX_MED_RECORD_GOLDENS=1 python -m pytest -n 2 tests/test_golden_cxr.py \
        tests/test_golden_brats.py
"""

import json
import math
import os
import platform

import jax
import numpy as np

from configs import brats, chestxray14

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'goldens')
RECORD = os.environ.get('FEDJAX_MED_RECORD_GOLDENS') == '1'
# Keys that measure time, not behaviour.
TIMING_PREFIXES = ('time/',)
# Keys logged since the goldens were recorded (they report, and change no other value).
ADDED_KEYS = ('train/participants',)

_DPSGD = {'dp.mode': 'sample', 'local.sampling': 'poisson', 'dp.clip_norm': 0.5}

# name -> (task, {dotted field: value})
CASES = {
    'cxr_plain': ('chestxray14', {}),
    'cxr_partial_fedadam_prox': (
        'chestxray14',
        {
            'clients_per_round': 2,
            'server.optimizer': 'fedadam',
            'server.learning_rate': 0.03,
            'local.prox_mu': 0.01,
            'local.schedule': 'exponential',
            'local.optimizer': 'momentum',
            'local.learning_rate': 0.05,
        },
    ),
    'cxr_dpsgd_target': ('chestxray14', {**_DPSGD, 'dp.target_epsilon': 8.0, 'dp.chunk_size': 8}),
    'cxr_dpsgd_fast': (
        'chestxray14',
        {**_DPSGD, 'dp.noise_multiplier': 1.0, 'dp.fast_clipping': True, 'dp.accountant': 'pld'},
    ),
    'cxr_client_dp_adaptive': (
        'chestxray14',
        {
            'dp.mode': 'client',
            'dp.noise_multiplier': 0.3,
            'dp.clip_norm': 0.5,
            'dp.adaptive_clip': True,
        },
    ),
    'cxr_secagg_dropout': (
        'chestxray14',
        {'secagg.enabled': True, 'secagg.dropout_fraction': 0.25, 'secagg.clip': 0.5},
    ),
    'cxr_secagg_plus': (
        'chestxray14',
        {'secagg.enabled': True, 'secagg.neighbours': 2, 'secagg.threshold': 2},
    ),
    'cxr_client_dp_secagg': (
        'chestxray14',
        {
            'dp.mode': 'client',
            'dp.noise_multiplier': 0.3,
            'dp.clip_norm': 0.5,
            'secagg.enabled': True,
        },
    ),
    'cxr_quantize_rotate_bf16': (
        'chestxray14',
        {
            'compression.kind': 'quantize',
            'compression.bits': 4,
            'compression.rotate': True,
            'compression.broadcast_dtype': 'bfloat16',
        },
    ),
    'cxr_topk': (
        'chestxray14',
        {'compression.kind': 'topk', 'compression.topk_fraction': 0.1, 'clients_per_round': 3},
    ),
    'cxr_median': ('chestxray14', {'server.aggregator': 'median'}),
    'cxr_trimmed_mean': (
        'chestxray14',
        {'server.aggregator': 'trimmed_mean', 'server.trim_fraction': 0.25},
    ),
    'cxr_uniform_fedavgm': (
        'chestxray14',
        {'server.aggregator': 'uniform', 'server.optimizer': 'fedavgm'},
    ),
    'cxr_local': ('chestxray14', {'mode': 'local'}),
    'cxr_centralized': ('chestxray14', {'mode': 'centralized'}),
    'brats_plain': ('brats', {}),
    'brats_dpsgd_local': ('brats', {**_DPSGD, 'dp.noise_multiplier': 1.0, 'mode': 'local'}),
    'brats_3d': (
        'brats',
        {
            'data.patch_size': 8,
            'data.num_clients': 2,
            'data.partition': 'iid',
            'data.num_train': 32,
            'data.num_test': 16,
            'data.patches_per_case': 4,
            'local.batch_size': 4,
            'eval_batch_size': 8,
        },
    ),
    # Partial participation on the vectorised path: 4 of 16 hospitals a round. Recorded when the
    # round still trained all 16 with the absent ones masked; the round over the 4 participants
    # alone (host_round.py) reproduces them bit for bit.
    **{
        f'cxr_k16_m4_{name}': (
            'chestxray14',
            {
                'data.num_clients': 16,
                'data.partition': 'iid',
                'clients_per_round': 4,
                # 16 hospitals vmapped at once (0, automatic, is one at a time on a CPU).
                'clients_in_parallel': 16,
                'local.batch_size': 4,
                **fields,
            },
        )
        for name, fields in {
            'plain': {},
            'dpsgd': {**_DPSGD, 'dp.noise_multiplier': 1.0},
            'secagg_dropout': {'secagg.enabled': True, 'secagg.dropout_fraction': 0.25},
            'client_dp': {'dp.mode': 'client', 'dp.noise_multiplier': 0.3, 'dp.clip_norm': 0.5},
            'topk': {'compression.kind': 'topk', 'compression.topk_fraction': 0.1},
        }.items()
    },
}


def config_of(name: str):
    task, fields = CASES[name]
    c = (chestxray14 if task == 'chestxray14' else brats).get_config('smoke')
    c.num_rounds = 2
    for dotted, value in fields.items():
        *parents, leaf = dotted.split('.')
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def strip_timing(row: dict) -> dict:
    return {
        k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES) and k not in ADDED_KEYS
    }


def read_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [strip_timing(json.loads(line)) for line in f]


def environment() -> dict:
    """What decides the floating-point bits of a run: a golden recorded elsewhere is compared
    to float tolerance, one recorded in the same environment bit for bit."""
    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(
                (line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), ''
            )
    except OSError:
        pass
    return {
        'jax': jax.__version__,
        'jaxlib': jax.lib.__version__,
        'numpy': np.__version__,
        'machine': platform.machine(),
        'cpu': cpu,
    }


# The cxr_k16_m4 goldens were recorded when the vectorised round still trained all 16
# hospitals with the absent ones masked. The round over the 4 participants alone reproduces them
# bit for bit except where a vmapped reduction over the client axis now runs over 4 slots instead
# of 16 rows (e.g. DP-SGD's mean gradient norm, 7e-8 relative): float tolerance for them.
FLOAT_TOLERANCE_ONLY = tuple(name for name in CASES if name.startswith('cxr_k16_m4_'))


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f'{name}.json')


def record(name: str, rows: list[dict]) -> None:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(golden_path(name), 'w') as f:
        json.dump({'environment': environment(), 'rows': rows}, f, indent=1, sort_keys=True)
        f.write('\n')


def _close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True))
    if (
        isinstance(a, bool)
        or isinstance(b, bool)
        or not isinstance(a, (int, float))
        or not isinstance(b, (int, float))
    ):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)


def compare(name: str, rows: list[dict], *, exact: bool | None = None) -> list[str]:
    """Differences between `rows` and the golden of `name` (empty: the same). `exact`: compare
    bit for bit (default: when recorded in this environment) or to float tolerance (e.g. a run
    sharded over several devices, whose reductions sum in another order)."""
    with open(golden_path(name)) as f:
        golden = json.load(f)
    if exact is None:
        exact = golden['environment'] == environment() and name not in FLOAT_TOLERANCE_ONLY
    # Recorded on another CPU or library version: XLA may sum in another order, so values
    # agree to float rounding only, compounded over two rounds of training.
    rtol, atol = (0.0, 0.0) if exact else (2e-3, 2e-4)
    want = golden['rows']
    problems = []
    if len(rows) != len(want):
        return [f'{len(rows)} rows, golden has {len(want)}']
    for i, (got, ref) in enumerate(zip(rows, want, strict=True)):
        if sorted(got) != sorted(ref):
            problems.append(
                f'row {i}: keys differ: extra {sorted(set(got) - set(ref))}, '
                f'missing {sorted(set(ref) - set(got))}'
            )
            continue
        for key in ref:
            if not _close(got[key], ref[key], rtol, atol):
                problems.append(f'row {i} {key}: {got[key]!r} != golden {ref[key]!r}')
    return problems
