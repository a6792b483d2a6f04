"""Whole smoke runs with DP and with secure aggregation: what the user sees in metrics.jsonl."""

import json
import math
import os

import numpy as np
import pytest

from configs import brats, chestxray14
from fedjax_med import train


def rows(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_sample_dp_run_reports_growing_epsilon_and_refuses_a_resume_with_more_rounds(tmp_path):
    c = chestxray14.get_config('smoke')
    c.local.sampling = 'poisson'
    c.dp.mode = 'sample'
    c.dp.target_epsilon = 4.0
    c.num_rounds = 2  # sigma is calibrated so that 2 rounds end at epsilon <= 4
    train.run(c, str(tmp_path / 'a'))
    eps = [r['privacy/epsilon'] for r in rows(tmp_path / 'a')]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0 + 1e-6
    assert eps[1] > 3.0  # calibrated to the target, not far below it
    # Each hospital's own sigma brings it to the target; hospitals of other sizes need other
    # sigmas.
    last = rows(tmp_path / 'a')[-1]
    np.testing.assert_allclose(last['privacy/epsilon_per_hospital'], 4.0, rtol=1e-3)
    sigmas = last['privacy/noise_multiplier_per_hospital']
    assert len(set(sigmas)) > 1 and last['privacy/noise_multiplier'] == max(sigmas)
    # Asking for more rounds on the same budget. Behaviour change: this resume used to run and stop
    # at the budget, but it recalibrated sigma for 4 rounds while the accountant kept the 2-round
    # sigma of the rounds already run (epsilon misreported). It is now refused at start-up, and
    # leaves the workdir (config.json, metrics) as it was.
    config_json = (tmp_path / 'a' / 'config.json').read_text()
    c.num_rounds = 4
    with pytest.raises(
        ValueError,
        match=r'num_rounds: checkpoint has 2, config has 4\. The DP '
        r'noise is calibrated to num_rounds .*Keep --config.num_rounds=2, or '
        r'start a new --workdir',
    ):
        train.run(c, str(tmp_path / 'a'))
    assert (tmp_path / 'a' / 'config.json').read_text() == config_json
    assert [r['privacy/epsilon'] for r in rows(tmp_path / 'a')] == eps


def test_dp_run_with_noise_as_given_can_be_resumed_with_more_rounds(tmp_path):
    # sigma is dp.noise_multiplier, not calibrated from num_rounds: extending the run is allowed.
    c = chestxray14.get_config('smoke')
    c.local.sampling, c.dp.mode, c.dp.noise_multiplier = 'poisson', 'sample', 1.0
    c.num_rounds, c.eval_every = 1, 100
    train.run(c, str(tmp_path / 'e'))
    c.num_rounds = 2
    train.run(c, str(tmp_path / 'e'))
    got = rows(tmp_path / 'e')
    assert [r['round'] for r in got] == [1, 2]
    assert 0 < got[0]['privacy/epsilon'] < got[1]['privacy/epsilon']


def test_budget_stop_checkpoints_the_last_round_run(tmp_path, monkeypatch, capsys):
    # With noise calibrated from num_rounds the budget is not reached in a run's own rounds, so
    # the accountant's answer is forced: the budget is spent after round 2 of 3.
    from fedjax_med.checkpoint import Checkpointer
    from fedjax_med.privacy import plan as privacy_plan

    monkeypatch.setattr(
        privacy_plan.PrivacyPlan,
        'check_budget',
        lambda self, steps: 'Privacy budget reached' if self.rounds_done >= 2 else None,
    )
    c = chestxray14.get_config('smoke')
    c.local.sampling, c.dp.mode, c.dp.target_epsilon = 'poisson', 'sample', 4.0
    c.num_rounds, c.eval_every, c.checkpoint_every = 3, 100, 100
    train.run(c, str(tmp_path / 'b'))
    assert 'Privacy budget reached' in capsys.readouterr().out
    _, host = Checkpointer(str(tmp_path / 'b' / 'checkpoints')).restore_arrays()
    assert host['round'] == 2 and host['privacy']['rounds_done'] == 2
    assert [r['round'] for r in host['history']] == [1, 2]


def test_dp_sgd_run_logs_how_many_examples_it_clipped(tmp_path):
    def first_row(clip_norm, name):
        c = chestxray14.get_config('smoke')
        c.local.sampling, c.dp.mode = 'poisson', 'sample'
        c.dp.noise_multiplier, c.dp.clip_norm, c.num_rounds = 0.5, clip_norm, 1
        train.run(c, str(tmp_path / name))
        return rows(tmp_path / name)[0]

    tight, loose = first_row(1e-6, 'tight'), first_row(1e6, 'loose')
    assert tight['dp/clip_fraction'] == 1.0 and loose['dp/clip_fraction'] == 0.0
    # The mean norm before clipping is the same model's at the first step, whatever the clip.
    assert tight['dp/grad_norm_mean'] > 0 and loose['dp/grad_norm_mean'] > 0


def test_client_level_dp_with_adaptive_clipping_runs_and_accounts(tmp_path):
    c = brats.get_config('smoke')
    c.dp.mode = 'client'
    c.dp.noise_multiplier = 0.5
    c.dp.adaptive_clip = True
    c.dp.count_noise_std = 1.0
    c.num_rounds = 2
    s = train.run(c, str(tmp_path / 'c'))
    eps = [r['privacy/epsilon'] for r in rows(tmp_path / 'c')]
    assert 0 < eps[0] < eps[1]  # three hospitals: large, printed as is
    assert all(0 <= r['dp/unclipped_fraction'] <= 1 for r in rows(tmp_path / 'c'))
    assert np.isfinite(s['eval/mean_dice'])


@pytest.mark.parametrize('dropout', [0.0, 0.34])
def test_secagg_run_matches_plain_run_and_logs_protocol_bytes(tmp_path, dropout):
    results = {}
    for enabled in (False, True):
        c = chestxray14.get_config('smoke')
        c.num_rounds = 2
        c.secagg.enabled = enabled
        c.secagg.clip = 0.5
        c.secagg.dropout_fraction = dropout if enabled else 0.0
        results[enabled] = train.run(c, str(tmp_path / f'sa{enabled}'))
    plain, masked = results[False], results[True]
    assert masked['comm/bytes_up'] > plain['comm/bytes_up']  # protocol messages are counted
    assert plain['comm/compression_ratio'] == 1.0 and masked['comm/compression_ratio'] < 1.0
    if dropout == 0:
        # Same model up to fixed-point rounding (resolution clip / 2^20 per coordinate).
        assert abs(masked['eval/mean_auroc'] - plain['eval/mean_auroc']) < 0.01
        assert abs(masked['train/loss'] - plain['train/loss']) < 1e-3
    else:
        assert np.isfinite(masked['eval/mean_auroc'])
    # Cumulative upload: every participant's protocol messages, but a dropped hospital's masked
    # update is never sent. Smoke: all hospitals take part in every round.
    c = chestxray14.get_config('smoke')
    n = c.data.num_clients
    payload = 4 * (plain['comm/bytes_up'] // 4 + 1)  # float32 update, plus the weight share
    dropped = math.floor(dropout * n)
    logged = rows(tmp_path / 'saTrue')
    total = sum(r['comm/bytes_up'] * n - payload * dropped for r in logged)
    assert logged[-1]['comm/cum_bytes_up_per_client'] == pytest.approx(total / n)


def test_client_level_dp_under_secagg_sends_no_weight():
    from fedjax_med import comm

    c = brats.get_config('smoke')
    params = {'w': np.zeros((3, 4), np.float32), 'b': np.zeros(4, np.float32)}
    c.secagg.enabled = True
    assert comm.round_bytes(params, c)[1] == 4 * (16 + 1)  # FedAvg: updates and weight share
    c.dp.mode = 'client'
    assert comm.round_bytes(params, c)[1] == 4 * 16


def test_fast_clipping_run_equals_naive_dp_sgd_run(tmp_path):
    # Same sampling, same noise keys: the fast norms must give the same model as vmap-of-grad.
    from fedjax_med.checkpoint import Checkpointer

    for fast in (False, True):
        c = brats.get_config('smoke')
        c.num_rounds = 1
        c.local.sampling = 'poisson'
        c.dp.mode = 'sample'
        c.dp.noise_multiplier = 0.8
        c.dp.clip_norm = 0.5
        c.dp.fast_clipping = fast
        train.run(c, str(tmp_path / f'fast{fast}'))
    a, _ = Checkpointer(str(tmp_path / 'fastFalse' / 'checkpoints')).restore_arrays()
    b, _ = Checkpointer(str(tmp_path / 'fastTrue' / 'checkpoints')).restore_arrays()
    import jax

    for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params']), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_quantised_updates_report_their_exact_size(tmp_path):
    from fedjax_med.aggregation import compression

    c = chestxray14.get_config('smoke')
    c.num_rounds = 1
    c.compression.kind = 'quantize'
    c.compression.bits = 8
    s = train.run(c, str(tmp_path / 'q8'))
    n = s['summary/num_params']
    # 8-bit levels plus a float32 (min, step) pair per parameter leaf.
    assert n < s['comm/bytes_up'] < n + 8 * 64
    assert s['comm/compression_ratio'] == pytest.approx(4 * n / s['comm/bytes_up'])
    assert 3.5 < s['comm/compression_ratio'] < 4.0
    assert compression.bytes_per_update({'w': np.zeros(1000)}, kind='quantize', bits=8) == 1008


def test_clipping_path_is_automatic_unless_set():
    # Unset: fast clipping on an accelerator for a model that supports it, never on a CPU (there
    # its second backward pass costs more than the per-example gradients it saves); set: obeyed.
    from fedjax_med import rounds
    from fedjax_med.models import build_model

    c = chestxray14.get_config('smoke')
    assert c.dp.fast_clipping is None
    model = build_model(c.model, c.task)
    assert not rounds.use_fast_clipping(c.dp, model, platform='cpu')
    assert rounds.use_fast_clipping(c.dp, model, platform='gpu')
    assert not rounds.use_fast_clipping(c.dp, None, platform='gpu')  # no model: not supported
    c.dp.fast_clipping = True
    assert rounds.use_fast_clipping(c.dp, model, platform='cpu')
    with pytest.raises(ValueError, match='config.dp.fast_clipping=True needs'):
        rounds.use_fast_clipping(c.dp, None)
    c.dp.fast_clipping = False
    assert not rounds.use_fast_clipping(c.dp, model, platform='gpu')
