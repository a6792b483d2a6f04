"""SHAP and integrated-gradients explanations of two runs and their agreement
(fedjax_med/explain.py): the Partition explainer gives a linear model's exact Shapley values,
the agreement scores on hand-made maps, and the command on a finished run against itself."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import chestxray14
from fedjax_med import explain, train
from tests.conftest import REPO


def test_shap_of_a_linear_model_is_its_exact_shapley_values():
    pytest.importorskip('shap')
    # f(x) = w . x with masked pixels set to the baseline b: phi_i = w_i (x_i - b_i) exactly,
    # for the output explained (class 1 of two).
    rng = np.random.default_rng(0)
    shape = (4, 4, 1)
    w = rng.standard_normal((2, *shape))
    b = rng.random(shape)
    x = rng.random((3, *shape)).astype(np.float32)
    predict = lambda z: np.tensordot(z, w, axes=([1, 2, 3], [1, 2, 3]))
    values = explain.shap_maps(predict, x, np.array([1, 1, 0]), baseline=b, max_evals=200)
    for i, c in enumerate([1, 1, 0]):
        np.testing.assert_allclose(values[i], w[c] * (x[i] - b), atol=1e-6)


def test_agreement_of_hand_made_maps():
    rng = np.random.default_rng(1)
    maps = rng.random((5, 10, 10))
    same = explain.agreement(maps, maps, top_fraction=0.1)
    assert same['spearman']['mean'] == pytest.approx(1.0)
    assert same['topk_overlap']['mean'] == pytest.approx(1.0)
    assert same['spearman']['ci95'] == pytest.approx([1.0, 1.0])
    # A reversed ordering: rank correlation -1, and the top 10 pixels of one are the bottom 10
    # of the other.
    opposite = explain.agreement(maps, -maps, top_fraction=0.1)
    assert opposite['spearman']['mean'] == pytest.approx(-1.0)
    assert opposite['topk_overlap']['mean'] == 0.0
    # One map shares 5 of its top 10 pixels with the other: IoU 5 / 15.
    a = np.arange(100.0).reshape(1, 10, 10)
    b = a.copy().ravel()
    b[[95, 96, 97, 98, 99]] = -1.0
    b[[0, 1, 2, 3, 4]] = 200.0
    half = explain.agreement(a, b.reshape(1, 10, 10), top_fraction=0.1)
    assert half['topk_overlap']['mean'] == pytest.approx(5 / 15)


def test_bootstrap_interval_covers_the_mean():
    values = np.random.default_rng(2).normal(0.5, 0.1, 200)
    ci = explain.bootstrap_ci(values)
    assert ci['ci95'][0] < ci['mean'] < ci['ci95'][1]
    # About 2 standard errors each side.
    assert ci['ci95'][1] - ci['ci95'][0] == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(200), rel=0.2)


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('explain') / 'smoke')
    config = chestxray14.get_config('smoke')
    config.num_rounds = 1
    train.run(config, workdir)
    return workdir


def test_a_run_explained_against_itself_agrees_fully(smoke_run, tmp_path):
    pytest.importorskip('shap')
    output = str(tmp_path / 'explain.json')
    result = explain.run([smoke_run, smoke_run], images=3, max_evals=200, ig_steps=4, output=output)
    with open(output) as f:
        saved = json.load(f)
    assert len(saved['findings']) == 3
    for method in explain.METHODS:
        assert saved['a_vs_b'][method]['spearman']['mean'] == pytest.approx(1.0)
        assert saved['a_vs_b'][method]['topk_overlap']['mean'] == pytest.approx(1.0)
    assert -1 <= saved['shap_vs_ig']['a']['spearman']['mean'] <= 1
    assert os.path.getsize(result['figure']) > 1000
    assert explain.summary_lines(result)[0].startswith('explanations of')


def test_command_errors_are_one_line_with_exit_status_2(smoke_run, tmp_path):
    out = subprocess.run(
        [sys.executable, '-m', 'fedjax_med.explain', f'--workdirs={smoke_run}'],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and 'Traceback' not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f'fedjax_med.explain: error: --workdirs={smoke_run}: give exactly two runs, e.g. '
        '--workdirs=runs/fed,runs/central.'
    ]
    with pytest.raises(explain.ExplainError, match=r'--workdirs: .*nope: no such folder'):
        explain.run([smoke_run, str(tmp_path / 'nope')], images=3)
