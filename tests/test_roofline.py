"""launch/roofline.py on the smoke config: the FLOPs it reports come from XLA's cost analysis of
the round's own step, so they must relate as a network's passes do, and its ratios must be the
ones it names."""

import importlib.util
import os
import sys

import pytest

from configs import chestxray14
from tests.conftest import REPO

SCRIPT = os.path.join(REPO, 'launch', 'roofline.py')


@pytest.fixture(scope='module')
def roofline():
    spec = importlib.util.spec_from_file_location('fedjax_med_roofline', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_flops_and_ratios_are_consistent(roofline, monkeypatch):
    monkeypatch.setattr(roofline, 'torch_step', lambda *args: None)  # torch is not a test dep
    c = chestxray14.get_config('smoke')
    c.tensorboard = False
    c.local.epochs = 0.5
    out = roofline.measure(c, reps=1, threads=1)
    forward, gradient, step = (
        out['forward']['gflop'],
        out['gradient']['gflop'],
        out['step']['gflop'],
    )
    # A backward pass costs about twice the forward (input and weight gradients); Adam adds a few
    # FLOPs per parameter, far less than a pass over a batch of images.
    assert 2.0 * forward < gradient < 4.0 * forward
    assert gradient <= step < gradient + 50 * out['num_params'] / 1e9
    assert out['steps_per_round'] == 8  # 4 hospitals of 36-45 images, half an epoch at batch 16
    assert out['round_gflops'] == pytest.approx(step * 8 / out['round_s'])
    assert out['round_over_steps'] == pytest.approx(out['round_s'] / (8 * out['step']['s']))
    peak = out['matmul_peak']
    assert peak['gflops'] == pytest.approx(2 * 1024**3 / peak['s'] / 1e9)
