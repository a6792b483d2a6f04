"""The benchmark's machinery (launch/benchmark.py): correctness only, never timing.

The sequential baseline must do exactly the vectorised round's work (same parameters), and the
whole benchmark must run end to end and write every key of its JSON report.
"""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location(
        'fedjax_med_benchmark', os.path.join(REPO, 'launch', 'benchmark.py')
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def fast_compile():
    """Both sides of a comparison compile with the same (cheap) XLA settings."""
    previous = bool(jax.config.values.get('jax_disable_most_optimizations'))
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', previous)


TINY = dict(
    model='resnet_small',
    task='chestxray14',
    resolution=8,
    channels=1,
    batch=3,
    steps=2,
    width=4,
    depth=1,
    norm_groups=2,
)


@pytest.mark.parametrize(
    'dp,clients_in_parallel', [('none', 0), ('sgd', 0), ('none', 2), ('none', 3)]
)
def test_sequential_loop_matches_vectorised_round(bench, dp, clients_in_parallel, fast_compile):
    """K=3 hospitals, 2 local Adam steps, FedAvg: the Python loop over a jitted single-hospital
    update with host aggregation gives the round's parameters (DP: same noise too), whether the
    round maps the hospitals one at a time (0: the automatic choice on CPU), vmaps chunks of two,
    or vmaps all three at once."""
    workload = bench.Workload(**TINY, clients_in_parallel=clients_in_parallel)
    setup = bench.build_round_setup(workload, bench.RoundSpec(3, 2, dp=dp), seed=1)
    key = bench.rounds.round_key(0, 0)
    seq = bench.SequentialBaseline(setup)
    params0 = jax.device_get(setup.state.params)
    seq_params, _ = seq.run(setup.state.params, setup.state.opt_state, key)
    seq_params = jax.device_get(seq_params)
    assert len(seq.host_aggregation_s) == 1
    state, _ = setup.round_fn(setup.state, setup.client_data, setup.inputs, key)
    vec_params = jax.device_get(state.params)
    moved = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(vec_params), jax.tree.leaves(params0), strict=True)
    ]
    assert max(moved) > 1e-4  # the round really trained
    for a, b in zip(jax.tree.leaves(seq_params), jax.tree.leaves(vec_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_clients_in_parallel_flag_reaches_every_round(bench):
    args = bench.parse_args(['--tiny', '--clients_in_parallel=1'])
    _, _, workloads, _, child_flags = bench.configure(args)
    assert {w.clients_in_parallel for w in workloads.values()} == {1}
    assert '--clients_in_parallel=1' in child_flags
    config = bench.make_config(workloads['resnet_small'], bench.RoundSpec(2, 1))
    assert config.clients_in_parallel == 1
    # Full mode: the large models as their configs train them, the small one vmapped.
    full = bench.WORKLOADS['full']
    assert (
        full['resnet18'].clients_in_parallel,
        full['unet'].clients_in_parallel,
        full['resnet_small'].clients_in_parallel,
    ) == (1, 1, 0)


def test_round_inputs_cover_the_work(bench):
    """Every real hospital runs `steps` full batches of distinct examples; padding takes no part."""
    w = bench.Workload(**TINY)
    spec = bench.RoundSpec(3, 2)
    inputs = bench.make_round_inputs(w, spec, num_padded=4, num_examples=6, seed=0)
    assert inputs.indices.shape == (4, 2, 3)
    for k in range(3):
        assert sorted(inputs.indices[k].ravel()) == list(range(6))
    np.testing.assert_array_equal(inputs.mask.sum(axis=(1, 2)), [6, 6, 6, 0])
    np.testing.assert_array_equal(inputs.weights > 0, [True, True, True, False])
    assert spec.label() == 'k3_s2'
    assert (
        bench.RoundSpec(5, 2, dp='sgd', secagg=True, dtype='bfloat16').label()
        == 'k5_s2_dp_sgd_secagg_bfloat16'
    )


def test_tiny_benchmark_end_to_end(bench, tmp_path):
    path = tmp_path / 'bench.json'
    results = bench.main(['--tiny', f'--json={path}'])
    with open(path) as f:
        report = json.load(f)
    required = (
        'vmap_vs_sequential_speedup',
        'dp_over_nondp_throughput',
        'dp_fast_over_nondp_throughput',
        'federated_over_centralized_throughput',
        'secagg_overhead',
        'secagg_overhead_with_host',
        'bf16_over_fp32_throughput',
        'scaling_k',
        'scaling_devices',
        'peak_memory_bytes',
        'compile_time_s',
        'device',
        'jax_version',
        'measurements',
        'models',
        'errors',
        'skipped',
        'notes',
    )
    for key in required:
        assert key in report, key
    assert report['errors'] == {} and report['skipped'] == {}
    for key in (
        'vmap_vs_sequential_speedup',
        'dp_over_nondp_throughput',
        'federated_over_centralized_throughput',
        'secagg_overhead',
        'bf16_over_fp32_throughput',
    ):
        assert report[key] > 0, key
    assert report['secagg_overhead_with_host'] >= report['secagg_overhead']
    assert set(report['scaling_k']) == {'1', '2'} and all(report['scaling_k'].values())
    assert report['scaling_devices'] == {'1': report['scaling_k']['2']}
    # Fast clipping: measured when the config field exists, otherwise a note says why not.
    if report['dp_fast_over_nondp_throughput'] is None:
        assert 'resnet_small/dp_fast' in report['notes']
    for m in report['measurements'].values():
        assert m['examples_per_s'] > 0 and m['compile_s'] > 0
    # The same work in both halves of each ratio.
    ms = report['measurements']
    assert (
        ms['resnet_small/k2_s1']['examples_per_round']
        == ms['resnet_small/k1_s2']['examples_per_round']
        == ms['resnet_small/k2_s1_sequential']['examples_per_round']
    )
    assert 'resnet_small/k2_s1' in bench.format_table(results)


def test_budget_skips_and_errors_are_recorded(bench):
    """A spent time budget skips items and a failing item is an error: both are recorded in the
    report, neither stops the run."""
    workloads = {'resnet_small': bench.Workload(**TINY)}
    b = bench.Benchmark('tiny', bench.MODES['tiny'], workloads)
    out = b.run([('resnet_small', 'nonsense')], budget_s=1e9)
    assert 'unknown benchmark item' in out['errors']['resnet_small/nonsense']
    out = b.run([('resnet_small', 'dp')], budget_s=-1.0)
    assert 'resnet_small/dp' in out['skipped'] and out['measurements'] == {}


def test_fast_clipping_round_asks_for_ghost_norms(bench):
    """Both benchmark models support fast clipping, and its round config turns it on."""
    for kwargs in (TINY, dict(TINY, model='unet', task='brats', channels=4)):
        assert bench.fast_clipping_unavailable(bench.Workload(**kwargs)) is None
    config = bench.make_config(bench.Workload(**TINY), bench.RoundSpec(2, 1, dp='fast'))
    assert config.dp.fast_clipping and config.dp.mode == 'sample'
    assert not bench.make_config(bench.Workload(**TINY), bench.RoundSpec(2, 1)).dp.fast_clipping
