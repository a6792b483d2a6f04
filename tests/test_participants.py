"""Partial participation on the vectorised path: the round's client axis holds the m
participants, not all K hospitals (fedjax_med/host_round.py, rounds._Slots).

The goldens `cxr_k16_m4_*` (tests/golden_cases.py) were recorded when the vectorised round
still trained all 16 hospitals (vmapped) with the absent ones masked; test_golden_cxr.py checks
that the participants-only round reproduces them (plain, DP-SGD, SecAgg with dropouts,
client-level DP, top-k with per-hospital error feedback): bit for bit but for reductions over the
client axis, to float tolerance (golden_cases.FLOAT_TOLERANCE_ONLY). Here: the same across a
resume and on 3 devices, the slots themselves, and that the compiled round's work follows m.
"""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from fedjax_med import experiment, host_round, parallel, train
from fedjax_med.aggregation.secure import SecAggInputs
from tests import golden_cases
from tests.conftest import REPO

K16 = [name for name in golden_cases.CASES if name.startswith('cxr_k16_m4_')]
# On 3 devices: the cases whose per-slot inputs or state are re-indexed (sigma_k, SecAgg keys and
# dropouts, top-k residuals); plain and client-DP rounds read nothing per slot beyond these.
K16_SHARDED = ['cxr_k16_m4_dpsgd', 'cxr_k16_m4_secagg_dropout', 'cxr_k16_m4_topk']


def fake_mesh(num_devices: int):
    return SimpleNamespace(devices=np.empty(num_devices))


@pytest.mark.parametrize(
    'per_round,devices,expected',
    [(4, 1, 4), (4, 3, 6), (0, 1, 16), (16, 1, 16), (15, 8, 16), (2, 8, 8)],
)
def test_the_round_has_m_slots_padded_to_the_devices(per_round, devices, expected):
    c = golden_cases.config_of('cxr_k16_m4_plain')
    c.clients_per_round = per_round
    assert host_round.num_slots(c, 16, fake_mesh(devices)) == expected


def test_slots_hold_the_participants_in_order_then_inert_padding():
    c = golden_cases.config_of('cxr_k16_m4_dpsgd')
    exp = experiment.build(c, parallel.make_mesh())
    planner = exp.planner
    assert planner.num_slots == 4 and planner.k_pad == 16
    for r in range(c.num_rounds):
        chosen = np.flatnonzero(host_round.sample_participants(c, r, 16))
        prepared = planner.prepare(r)
        inputs = jax.tree.map(np.asarray, prepared.inputs)
        assert inputs.client_ids.tolist() == chosen.tolist()
        assert prepared.participants == chosen.tolist()
        assert inputs.indices.shape[0] == inputs.weights.shape[0] == 4
        # Each slot carries its hospital's own sigma, DP-SGD denominator and step count.
        np.testing.assert_array_equal(inputs.noise_multiplier, planner.noise_multiplier[chosen])
        np.testing.assert_array_equal(inputs.step_active.sum(1), planner.steps[chosen])
        np.testing.assert_array_equal(prepared.round_steps[chosen], planner.steps[chosen])
        assert prepared.round_steps.sum() == planner.steps[chosen].sum()  # absent: no epsilon


def test_padding_slots_and_secagg_inputs_are_reindexed_to_the_slots():
    k = 5
    rng = np.random.default_rng(0)
    sym = rng.integers(1, 2**31, (k, k, 2), dtype=np.uint32)
    sym = np.triu(sym.transpose(2, 0, 1), 1).transpose(1, 2, 0)
    sym = sym + sym.transpose(1, 0, 2)
    signs = np.sign(np.arange(k)[None, :] - np.arange(k)[:, None]).astype(np.int32)
    inputs = SecAggInputs(
        pair_keys=sym,
        pair_signs=signs,
        self_keys=rng.integers(1, 9, (k, 2), dtype=np.uint32),
        survivor=np.array([1, 0, 1, 1, 0], np.float32),
        recovered_self_keys=np.zeros((k, 2), np.uint32),
        recovered_pair_keys=np.zeros((k, k, 2), np.uint32),
    )
    ids = np.array([0, 2, 3, k], np.int32)  # three participants and a padding slot
    slots = host_round._secagg_slots(inputs, ids)
    np.testing.assert_array_equal(slots.pair_keys[:3, :3], sym[np.ix_([0, 2, 3], [0, 2, 3])])
    np.testing.assert_array_equal(slots.pair_signs[:3, :3], [[0, 1, 1], [-1, 0, 1], [-1, -1, 0]])
    assert not slots.pair_signs[3].any() and not slots.pair_signs[:, 3].any()
    assert not slots.pair_keys[3].any() and slots.survivor.tolist() == [1, 1, 1, 0]
    every = np.arange(k, dtype=np.int32)
    assert host_round._secagg_slots(inputs, every) is inputs


@pytest.mark.parametrize('name', ['cxr_k16_m4_secagg_dropout', 'cxr_k16_m4_topk'])
def test_a_resumed_participants_only_run_equals_the_golden(name, tmp_path):
    workdir = str(tmp_path / name)
    c = golden_cases.config_of(name)
    train.run(c, workdir, stop_after=1)
    summary = train.run(c, workdir)
    assert summary['summary/round_traces'] == 1
    rows = golden_cases.read_rows(workdir)
    assert golden_cases.compare(name, rows) == []
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        logged = [json.loads(line)['train/participants'] for line in f]
    assert logged == [
        np.flatnonzero(host_round.sample_participants(c, r, 16)).tolist()
        for r in range(c.num_rounds)
    ]


def test_on_three_devices_the_participants_only_round_equals_the_golden(tmp_path):
    # 16 hospitals pad to 18 rows, 4 participants to 6 slots over 3 devices; the reductions
    # over the sharded client axis sum in another order, so this is float tolerance.
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        from fedjax_med import train
        from tests import golden_cases
        out = {{}}
        for name in {K16_SHARDED!r}:
            workdir = {str(tmp_path)!r} + '/' + name
            summary = train.run(golden_cases.config_of(name), workdir)
            assert summary['summary/num_devices'] == 3, summary['summary/num_devices']
            out[name] = (golden_cases.compare(name, golden_cases.read_rows(workdir),
                                              exact=False), summary['summary/round_traces'])
        print('RESULT' + json.dumps(out))
    """)
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS='cpu',
        XLA_FLAGS='--xla_force_host_platform_device_count=3',
    )
    proc = subprocess.run(
        [sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    assert result == {name: [[], 1] for name in K16_SHARDED}


def test_the_compiled_round_does_the_work_of_its_participants():
    """XLA's own count of the round's floating-point operations: 4 of 16 slots do about a
    quarter of the work of all 16 (before, the same as all 16)."""

    def flops(per_round: int) -> float:
        c = golden_cases.config_of('cxr_k16_m4_plain')
        c.clients_per_round = per_round
        exp = experiment.build(c, parallel.make_mesh())
        inputs = exp.planner.prepare(0).inputs
        lowered = exp.round_fn.fn.lower(
            exp.state, exp.client_data, inputs, exp.round_key(c.seed, 0)
        )
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost['flops'])

    ratio = flops(4) / flops(0)
    assert 0.2 < ratio < 0.3, ratio
