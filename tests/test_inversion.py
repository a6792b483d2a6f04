"""Gradient inversion (fedjax_med/inversion.py): one image of the synthetic chest X-ray twin is
recovered from a non-private gradient of a small model and is not from its DP-SGD gradient or
its SecAgg-masked update; PSNR and SSIM against hand-computed values and their identities."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from fedjax_med import inversion, tasks
from fedjax_med.data import synthetic

# Measured on this test's image and model (seed 0, 300 steps): 25.2 dB / SSIM 0.78 without
# DP; 4.8 dB under DP-SGD (sigma 1, C 1) and 5.4 dB from the SecAgg-masked update. A flat image
# at the original's mean brightness scores 19.0 dB / SSIM 0.07, so the thresholds ask for more
# than the brightness.
PLAIN_MIN_PSNR = 22.0
PLAIN_MIN_SSIM = 0.5
PROTECTED_MAX_PSNR = 10.0


class _Small(nn.Module):
    """One 3 x 3 convolution and a dense head: the small model of the attack."""

    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Conv(8, (3, 3))(x))
        return nn.Dense(14)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope='module')
def attacked():
    data = synthetic.synthetic_cxr(1, 16, 0)
    model = _Small()
    params = model.init(jax.random.key(1), data['image'])
    result = inversion.attack_cases(
        model.apply,
        tasks.TASKS['chestxray14'].per_example_loss,
        params,
        data['image'],
        data['label'],
        steps=300,
        noise_multiplier=1.0,
        clip_norm=1.0,
    )
    return data, result


def test_non_private_gradient_gives_the_image_back(attacked):
    data, result = attacked
    plain = result['plain']
    assert plain['psnr_mean'] >= PLAIN_MIN_PSNR, plain['psnr']
    assert plain['psnr_mean'] > inversion.flat_image_psnr(data['image'])[0] + 3
    assert plain['ssim_mean'] >= PLAIN_MIN_SSIM, plain['ssim']
    assert plain['gradient_cosine'] == pytest.approx(1.0)


def test_dp_noise_and_secagg_masks_defeat_it(attacked):
    _, result = attacked
    for case in ('dp_sgd', 'secagg'):
        assert result[case]['psnr_mean'] < PROTECTED_MAX_PSNR, (case, result[case]['psnr'])
        # What the server holds is all but orthogonal to the true gradient.
        assert abs(result[case]['gradient_cosine']) < 0.05, case


def test_figure(attacked, tmp_path):
    data, result = attacked
    path = inversion.figure(str(tmp_path / 'inversion.png'), data['image'], result, 'test')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_cosine_distance_and_total_variation():
    a = {'w': np.array([1.0, 0.0]), 'b': np.array([0.0])}
    assert float(inversion.cosine_distance(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(inversion.cosine_distance(a, {'w': np.array([-3.0, 0.0]), 'b': np.zeros(1)})) == (
        pytest.approx(2.0)
    )
    assert float(inversion.cosine_distance(a, {'w': np.array([0.0, 2.0]), 'b': np.zeros(1)})) == (
        pytest.approx(1.0)
    )
    # A vertical edge 0 | 1 in a 2 x 2 image: horizontal differences 1 (mean 1), vertical 0.
    edge = np.array([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
    assert float(inversion.total_variation(edge)) == pytest.approx(1.0)


def test_psnr():
    x = np.zeros((2, 4, 4, 1))
    y = x.copy()
    y[0] += 0.1  # mse 0.01: 20 dB
    p = inversion.psnr(y, x)
    assert p[0] == pytest.approx(20.0)
    assert np.isinf(p[1])


def test_ssim_of_an_image_with_itself_is_one():
    rng = np.random.default_rng(0)
    x = rng.random((24, 24))
    assert inversion.ssim(x, x) == pytest.approx(1.0)
    assert inversion.ssim(x[..., None].repeat(3, -1), x[..., None].repeat(3, -1)) == (
        pytest.approx(1.0)
    )


def test_ssim_of_constant_images_by_hand():
    # Constant images a and b: mu = a, b, no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    # at every window position (the contrast-structure factor is C2 / C2 = 1).
    a, b, c1 = 0.2, 0.6, (0.01 * 1.0) ** 2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    assert inversion.ssim(np.full((16, 16), a), np.full((16, 16), b)) == pytest.approx(expected)


def test_ssim_symmetry_bounds_and_ordering():
    rng = np.random.default_rng(1)
    x = rng.random((32, 32))
    slightly = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
    very = np.clip(x + 0.5 * rng.standard_normal(x.shape), 0, 1)
    s1, s2 = inversion.ssim(x, slightly), inversion.ssim(x, very)
    assert s1 == pytest.approx(inversion.ssim(slightly, x))
    assert 1.0 > s1 > s2 > -1.0
    # An inverted image (1 - x) is anti-correlated in every window.
    assert inversion.ssim(x, 1.0 - x) < 0


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip('skimage.metrics')
    rng = np.random.default_rng(2)
    x = rng.random((32, 32))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    oracle = metrics.structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert inversion.ssim(x, y) == pytest.approx(oracle, abs=1e-6)
