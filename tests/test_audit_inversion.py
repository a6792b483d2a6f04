"""`python -m fedjax_med.audit --inversion`: gradient inversion of one hospital's first-round
gradient of a finished run's own model, its metrics in audit.json and RUN/inversion.png."""

import json
import os

import pytest

from configs import chestxray14
from fedjax_med import audit, train


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('inversion') / 'smoke')
    config = chestxray14.get_config('smoke')
    config.num_rounds = 1
    train.run(config, workdir)
    return workdir


def test_audit_inversion_writes_its_metrics_and_figure(smoke_run):
    result = audit.run(
        smoke_run, max_examples=50, inversion={'hospital': 1, 'images': 1, 'steps': 20}
    )
    with open(os.path.join(smoke_run, 'audit.json')) as f:
        saved = json.load(f)['inversion']
    assert saved['hospital'] == 'hospital_1' and saved['images'] == 1 and saved['steps'] == 20
    assert saved['model'].startswith("the run's own resnet_small")
    # The smoke run has no DP: the attack's DP-SGD case uses C = 1 and sigma = 1.
    assert (
        saved['dp_sgd_settings']['noise_multiplier'] == 1.0
        and saved['dp_sgd_settings']['clip_norm'] == 1.0
    )
    for case in ('plain', 'dp_sgd', 'secagg'):
        assert len(saved[case]['psnr']) == 1 and -1 <= saved[case]['ssim_mean'] <= 1
    assert saved['plain']['gradient_cosine'] == pytest.approx(1.0)
    assert abs(saved['secagg']['gradient_cosine']) < 0.1
    assert os.path.getsize(saved['figure']) > 1000
    assert any(line.startswith('  gradient inversion hospital_1') for line in
               audit.summary_lines(result))  # fmt: skip


@pytest.mark.parametrize(
    ('inversion', 'message'),
    [
        ({'hospital': 9, 'images': 1, 'steps': 5}, r'--inversion_hospital=9: no such hospital'),
        ({'hospital': 0, 'images': 0, 'steps': 5}, r'--inversion_images=0: the attacked batch'),
        ({'hospital': 0, 'images': 1, 'steps': 0}, r'--inversion_steps=0: must be at least 1'),
    ],
)
def test_audit_inversion_values_the_run_cannot_take_are_one_line(smoke_run, inversion, message):
    with pytest.raises(audit.AuditError, match=message):
        audit.run(smoke_run, max_examples=10, inversion=inversion)


def test_a_model_too_large_is_swapped_for_the_smoke_sized_one(smoke_run, monkeypatch, tmp_path):
    monkeypatch.setattr(audit, '_INVERSION_MAX_PARAMS', 0)
    exp, _, _, _ = audit.load(smoke_run)
    saved = audit._inversion(exp, str(tmp_path), hospital=0, images=1, steps=5)
    assert saved['model'].startswith('the smoke-sized resnet_small (width 8, depth 2) at 32 px')
    assert saved['plain']['gradient_cosine'] == pytest.approx(1.0)
    assert os.path.exists(tmp_path / 'inversion.png')
