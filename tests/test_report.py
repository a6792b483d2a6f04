"""fedjax_med.report on tiny smoke runs, and the integrated-gradients axioms of attribution.py."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import brats, chestxray14
from fedjax_med import attribution, report, train


def _train(module, workdir, **overrides):
    config = module.get_config('smoke')
    config.num_rounds = 2
    config.checkpoint_every = 2
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = value
    train.run(config, str(workdir))
    return workdir


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    _train(chestxray14, root / 'cxr_fed')
    _train(chestxray14, root / 'cxr_central', mode='centralized')
    _train(brats, root / 'brats_fed')
    return root


def test_report_writes_figures_and_index(runs, tmp_path):
    pngs = report.make_report([str(runs)], str(tmp_path), ig_steps=8, num_examples=2)
    names = {os.path.basename(p) for p in pngs}
    for expected in (
        'chestxray14_metric_vs_round.png',
        'chestxray14_comm_utility.png',
        'chestxray14_hospital_fairness.png',
        'chestxray14_attribution.png',
        'brats_metric_vs_round.png',
        'brats_overlays.png',
    ):
        assert expected in names
    assert 'chestxray14_privacy_utility.png' not in names  # no DP run: nothing to trade off
    index = (tmp_path / 'index.html').read_text()
    referenced = set(re.findall(r'<img src="([^"]+)"', index))
    assert referenced == names
    for name in names:
        assert (tmp_path / name).stat().st_size > 1000
    agreement = json.loads((tmp_path / 'attribution_agreement.json').read_text())
    assert -1.0 <= agreement['mean_spearman'] <= 1.0
    assert 0.0 <= agreement['mean_top10_iou'] <= 1.0
    assert 'cxr_fed' in agreement['models'][0] and 'cxr_central' in agreement['models'][1]


def test_report_command_line_on_one_run(runs, tmp_path):
    report.main([str(runs / 'brats_fed'), '--out', str(tmp_path), '--no_models'])
    assert (tmp_path / 'brats_metric_vs_round.png').exists()
    assert 'brats_metric_vs_round.png' in (tmp_path / 'index.html').read_text()


def test_load_run_reads_series_and_totals(runs):
    run = report.load_run(str(runs / 'cxr_fed'))
    rounds, values = run.series('eval/mean_auroc')
    assert rounds.tolist() == [1.0, 2.0] and np.all((values >= 0) & (values <= 1))
    assert run.algorithm == 'fedavg' and run.finished and run.total_bytes_per_hospital > 0
    assert set(run.hospital_metrics()) == {f'hospital_{k}' for k in range(4)}


def _tiny_model():
    """A smooth nonlinear scalar function of an image: IG's quadrature converges fast."""
    w = jax.random.normal(jax.random.key(0), (6, 6, 2))
    v = jax.random.normal(jax.random.key(1), (6, 6, 2))
    return lambda x: jnp.tanh(jnp.sum(w * x)) + jnp.sum(v * x**2)


@pytest.mark.parametrize('steps, tolerance', [(8, 5e-2), (64, 1e-3)])
def test_integrated_gradients_completeness(steps, tolerance):
    f = _tiny_model()
    x = jax.random.uniform(jax.random.key(2), (6, 6, 2))
    baseline = 0.1 * jnp.ones_like(x)
    ig = attribution.integrated_gradients(f, x, baseline, steps=steps, chunk_size=5)
    gap = float(jnp.sum(ig) - (f(x) - f(baseline)))
    assert abs(gap) <= tolerance * abs(float(f(x) - f(baseline)))


def test_integrated_gradients_of_a_linear_model_is_exact():
    w = jnp.arange(12.0).reshape(2, 3, 2)
    x = jnp.ones((2, 3, 2))
    ig = attribution.integrated_gradients(lambda z: jnp.sum(w * z), x, steps=2)
    np.testing.assert_allclose(ig, w * x, rtol=1e-6)


def test_model_integrated_gradients_batches_per_image_class():
    w = jax.random.normal(jax.random.key(3), (4 * 4 * 1, 3))
    apply_fn = lambda images: jnp.tanh(images.reshape(len(images), -1) @ w)
    images = jax.random.uniform(jax.random.key(4), (2, 4, 4, 1))
    ig = attribution.model_integrated_gradients(apply_fn, images, jnp.array([0, 2]), steps=128)
    assert ig.shape == images.shape
    expected = apply_fn(images)[jnp.arange(2), jnp.array([0, 2])]  # f(0) = tanh(0) = 0
    np.testing.assert_allclose(ig.reshape(2, -1).sum(1), expected, rtol=1e-3, atol=1e-5)


def test_agreement_scores():
    a = jnp.arange(100.0).reshape(10, 10)
    assert float(attribution.spearman(a, a)) == pytest.approx(1.0)
    assert float(attribution.spearman(a, -a)) == pytest.approx(-1.0)
    assert float(attribution.spearman(a, a**3)) == pytest.approx(1.0)  # ranks only
    assert float(attribution.topk_overlap(a, a, 0.1)) == pytest.approx(1.0)
    assert float(attribution.topk_overlap(a, -a, 0.1)) == pytest.approx(0.0)


def test_a_run_older_than_a_config_field_loads_with_its_old_behaviour(runs, tmp_path):
    """config.json written before model.negative_slope existed: the report rebuilds the model
    the run trained (plain ReLUs) instead of failing on the missing field."""
    import shutil

    old = tmp_path / 'brats_old'
    shutil.copytree(runs / 'brats_fed', old)
    config = json.loads((old / 'config.json').read_text())
    assert config['model'].pop('negative_slope') == 0.1
    (old / 'config.json').write_text(json.dumps(config))
    run = report.load_run(str(old))
    assert run.config['model']['negative_slope'] == 0.0
    images = jnp.zeros((1, 16, 16, 4))
    assert report.load_model(run)(images).shape == (1, 16, 16, 3)


def test_overlays_show_the_largest_tumours_of_uint8_labels():
    """Labels are stored as uint8: the examples picked are those with the most tumour."""
    labels = np.zeros((5, 4, 4, 3), np.uint8)
    labels[1, :2, :2, 0] = 1  # 4 pixels
    labels[3, :, :, 0] = 1  # 16 pixels
    labels[4, 0, 0, 0] = 1  # 1 pixel
    assert report.largest_tumours(labels, 3).tolist() == [3, 1, 4]


def _fake_run(
    mode='none',
    target=0.0,
    sigma=0.0,
    eps=float('nan'),
    metric=0.5,
    *,
    training='federated',
    optimizer='fedavg',
    seed=0,
    task='brats',
    rounds=1,
):
    """A Run in memory: `rounds` rows, epsilon growing to `eps`, the metric ending at `metric`."""
    config = {
        'dp': {'mode': mode, 'target_epsilon': target, 'noise_multiplier': sigma},
        'task': task,
        'mode': training,
        'seed': seed,
        'num_rounds': rounds,
        'local': {'prox_mu': 0.0},
        'server': {'optimizer': optimizer},
        'data': {'partition': 'iid', 'dirichlet_alpha': 0.5},
    }
    key = f'eval/{report.main_metric(task)}'
    rows = [
        {'round': k, 'privacy/epsilon': eps * k / rounds, key: metric * k / rounds}
        for k in range(1, rounds + 1)
    ]
    return report.Run(
        path=f'/runs/{training}{optimizer}{mode}{target}{sigma}{seed}',
        config=config,
        rows=rows,
        summary=None,
        info={},
    )


def _figure_of(plot, runs, monkeypatch, tmp_path):
    """The Figure a plot function draws (captured instead of saved)."""
    figures = []
    monkeypatch.setattr(report, '_save', lambda fig, out_dir, name: figures.append(fig) or name)
    assert plot(runs, str(tmp_path), 'brats')
    (figure,) = figures
    figure.canvas.draw()
    return figure


def test_privacy_utility_keeps_fixed_sigma_runs_apart_from_runs_without_dp():
    runs = [
        _fake_run('none', 0.0, 0.0, float('nan'), 0.8),
        _fake_run('sample', 0.0, 1.5, 2.0, 0.3, seed=0),
        _fake_run('sample', 0.0, 1.5, 2.2, 0.5, seed=1),
        _fake_run('sample', 4.0, 0.0, 4.0, 0.4),
    ]
    # Fixed σ (both seeds together) and target ε 4; the run without DP has no ε: a reference.
    np.testing.assert_allclose(
        report.privacy_utility_points(runs), [(2.1, 0.4, 0.1), (4.0, 0.4, 0.0)]
    )
    assert report.no_dp_reference(runs) == (0.8, 0.0)
    assert report.no_dp_reference(runs[1:]) is None


def test_privacy_utility_draws_no_dp_as_a_labelled_line_not_a_point_on_the_epsilon_axis(
    monkeypatch, tmp_path
):
    runs = [
        _fake_run('none', metric=0.80, seed=0),
        _fake_run('none', metric=0.84, seed=1),
        _fake_run('sample', 4.0, eps=3.9, metric=0.4),
        _fake_run('sample', 8.0, eps=7.8, metric=0.6),
        _fake_run('none', metric=0.7, optimizer='fedadam'),
        _fake_run('sample', 4.0, eps=4.0, metric=0.3, optimizer='fedadam'),
    ]
    fig = _figure_of(report.plot_privacy_utility, runs, monkeypatch, tmp_path)
    (ax,) = fig.axes
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        'fedadam, DP',
        'fedadam, no DP',
        'fedavg, DP',
        'fedavg, no DP',
        'paper bound ε<4.5',
    ]
    # Every x tick is a number on the ε axis (no 'no DP' position), which starts at 0.
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert all(label.replace('−', '-').replace('.', '').isdigit() for label in labels), labels
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 7.8
    # The runs without DP: a horizontal line at their mean, spanning the axis.
    no_dp = [line for line in ax.get_lines() if line.get_label() == 'fedavg, no DP']
    (line,) = no_dp
    np.testing.assert_allclose(line.get_ydata(), [0.82, 0.82])
    assert line.get_xdata()[0] == 0 and line.get_xdata()[1] == 1  # axes coordinates
    # The DP runs (faint dots) and settings (error bars) sit at their achieved ε only.
    from matplotlib.collections import PathCollection

    dots = sorted(
        float(x)
        for c in ax.collections
        if isinstance(c, PathCollection)
        for x, _ in c.get_offsets()
    )
    assert dots == [3.9, 4.0, 7.8]
    bars = sorted(float(x) for c in ax.containers for x in c.lines[0].get_xdata())
    assert bars == [3.9, 4.0, 7.8]


def test_round_axes_have_integer_ticks(monkeypatch, tmp_path):
    runs = [_fake_run('sample', 4.0, eps=4.0, metric=0.5, rounds=3)]
    for plot in (report.plot_epsilon_vs_round, report.plot_metric_vs_round):
        fig = _figure_of(plot, runs, monkeypatch, tmp_path)
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [1.0, 2.0, 3.0], (plot.__name__, ticks)


def test_overlay_contours_stay_visible_where_regions_share_a_border():
    """WT, TC, ET drawn in that order, each on top and no wider than the one below; ET dashed, so
    a TC border that is also ET's (an enhancing rim) shows in its gaps; one figure legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    masks = np.zeros((16, 16, 3), np.uint8)
    masks[2:14, 2:14, 0] = 1
    masks[4:12, 4:12, 1] = 1
    masks[4:12, 4:12, 2] = 1  # ET == TC: their contours coincide
    masks[6:10, 6:10, 2] = 0  # (a rim around a necrotic core)
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = report.draw_regions(ax, masks)
    assert len(drawn) == 3
    widths = [c.get_linewidths()[0] for c in drawn]
    zorders = [c.get_zorder() for c in drawn]
    colours = [tuple(np.round(c.get_edgecolor()[0][:3], 3)) for c in drawn]
    assert widths[0] > widths[1] >= widths[2] and zorders == sorted(zorders)
    assert len(set(colours)) == 3
    dashes = [c.get_linestyles()[0] for c in drawn]
    assert dashes[2][1] is not None and dashes[1][1] is None  # ET dashed over a solid TC
    legend = report.region_legend(fig)
    assert [t.get_text() for t in legend.get_texts()] == [
        'WT (whole tumour)',
        'TC (tumour core)',
        'ET (enhancing tumour)',
    ]
    assert [h.get_linestyle() for h in legend.legend_handles] == ['-', '-', '--']


def test_attribution_caption_says_what_the_two_models_differ_in():
    fed, fed_dp = _fake_run('none'), _fake_run('sample', 4.0, eps=4.0)
    central = _fake_run('none', training='centralized')
    caption = report.attribution_caption([fed, fed_dp])
    assert 'they differ in privacy (no DP vs DP ε≤4)' in caption
    assert 'centralised' not in caption and 'federated' not in caption
    caption = report.attribution_caption([fed, central])
    assert caption.endswith('they differ in training (federated fedavg vs centralised).')
    assert 'of one model, fedavg (no DP, IID, seed 0)' in report.attribution_caption([fed])
