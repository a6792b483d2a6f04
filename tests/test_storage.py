"""Compact storage from the data source to the device: uint8 X-rays and labels, float16 MRI,
decoded to float32 only after the gather inside the jitted round and evaluation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import brats, chestxray14
from fedjax_med import evaluation, rounds, train
from fedjax_med.data import partition, sources, storage
from tests.test_data_sources import _config

CXR_TOLERANCE = 0.5 / 255 + 1e-6  # rounding to the nearest of 256 levels, plus float32 error


def test_cxr_round_trip_is_within_half_a_level():
    x = np.random.default_rng(0).uniform(-0.1, 1.1, (64, 8, 8, 1)).astype(np.float32)
    stored = storage.encode_images('chestxray14', x)
    assert stored.dtype == np.uint8
    np.testing.assert_allclose(storage.decode_images(stored), np.clip(x, 0, 1), atol=CXR_TOLERANCE)
    assert storage.decode_images(stored).dtype == np.float32
    # Already stored arrays pass through: a real dataset's PNG pixels are not rounded again.
    assert storage.encode_images('chestxray14', stored) is stored


def test_mri_and_labels_round_trip():
    x = np.random.default_rng(1).normal(0, 3, (16, 8, 8, 4)).astype(np.float32)
    labels = (np.random.default_rng(2).uniform(size=(16, 8, 8, 3)) > 0.5).astype(np.float32)
    stored = storage.encode('brats', {'image': x, 'label': labels, 'patient_id': np.arange(16)})
    assert stored['image'].dtype == np.float16 and stored['label'].dtype == np.uint8
    np.testing.assert_array_equal(stored['patient_id'], np.arange(16))
    back = storage.decode(stored)
    np.testing.assert_allclose(back['image'], x, rtol=2.0**-11)
    np.testing.assert_array_equal(back['label'], labels)
    assert back['image'].dtype == back['label'].dtype == np.float32


def test_decode_under_jit_matches_numpy():
    batch = {
        'image': np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1),
        'label': np.eye(4, 14, dtype=np.uint8),
        'mask': np.ones(4, np.float32),
    }
    on_device = jax.jit(storage.decode)(jax.device_put(batch))
    on_host = storage.decode(batch)
    for key in batch:
        assert on_device[key].dtype == jnp.float32
        np.testing.assert_allclose(on_device[key], on_host[key], rtol=1e-7)
    np.testing.assert_allclose(on_host['image'].ravel(), np.arange(256) / 255, rtol=1e-7)
    float_batch = {'image': np.linspace(-2, 2, 8, dtype=np.float32), 'label': np.ones(8)}
    np.testing.assert_array_equal(storage.decode(float_batch)['image'], float_batch['image'])


def _data_config(name, **kw):
    """test_data_sources' config, smaller: two IID hospitals."""
    return _config(
        name,
        **{
            'num_train': 120,
            'num_test': 40,
            'num_clients': 2,
            'partition': 'iid',
            'slices_per_case': 4,
            **kw,
        },
    )


def _float_pipeline(monkeypatch, cfg):
    """load_federated with the final rounding to storage dtypes switched off."""
    with monkeypatch.context() as m:
        m.setattr(storage, 'encode', lambda task, split: split)
        return sources.load_federated(cfg, seed=0)


def test_cxr_is_rounded_once_after_the_acquisition_shift(monkeypatch):
    cfg = _data_config('synthetic_cxr')
    compact = sources.load_federated(cfg, seed=0)
    exact = _float_pipeline(monkeypatch, cfg)
    unshifted = _float_pipeline(monkeypatch, _data_config('synthetic_cxr', feature_skew=False))
    for c, f, u in zip(
        compact.clients_train + [compact.test],
        exact.clients_train + [exact.test],
        unshifted.clients_train + [unshifted.test],
        strict=True,
    ):
        assert c['image'].dtype == np.uint8 and f['image'].dtype == np.float32
        np.testing.assert_allclose(
            storage.decode_images(c['image']), f['image'], atol=CXR_TOLERANCE
        )
        # The stored pixels are exactly the shifted float image rounded, i.e. the shift ran in
        # float on unrounded values and the rounding came last.
        np.testing.assert_array_equal(c['image'], np.rint(f['image'] * 255).astype(np.uint8))
        assert np.abs(f['image'] - u['image']).mean() > 0.01
        np.testing.assert_array_equal(c['label'], f['label'])


def test_brats_decodes_to_the_float_pipeline_within_float16_rounding(monkeypatch):
    cfg = _data_config('synthetic_brats')
    compact = sources.load_federated(cfg, seed=0)
    exact = _float_pipeline(monkeypatch, cfg)
    for c, f in zip(
        compact.clients_train + [compact.test], exact.clients_train + [exact.test], strict=True
    ):
        assert c['image'].dtype == np.float16 and c['label'].dtype == np.uint8
        np.testing.assert_allclose(
            storage.decode_images(c['image']), f['image'], rtol=2.0**-11, atol=1e-7
        )
        np.testing.assert_array_equal(c['label'], f['label'])


def test_acquisition_shift_decodes_stored_xrays_first():
    # A real dataset is read as uint8 PNG pixels: the shift must see them in [0, 1].
    stored = np.random.default_rng(3).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_array_equal(
        partition.apply_acquisition_shift(stored, 1, 'chestxray14', seed=0),
        partition.apply_acquisition_shift(stored / np.float32(255), 1, 'chestxray14', seed=0),
    )


@pytest.mark.parametrize('module,image_dtype', [(chestxray14, np.uint8), (brats, np.float16)])
def test_a_run_keeps_compact_arrays_on_the_device_and_learns(
    monkeypatch, tmp_path, module, image_dtype
):
    seen = {'train': [], 'test': []}  # (image dtype, label dtype) of the data each jit receives
    real_build_round_fn, real_build_eval_fn = rounds.build_round_fn, evaluation.build_eval_fn

    def build_round_fn(**kw):
        round_fn = real_build_round_fn(**kw)
        jitted = round_fn.fn

        def spied(state, client_data, inputs, key):
            assert isinstance(client_data['image'], jax.Array)  # resident on the device
            seen['train'].append((client_data['image'].dtype, client_data['label'].dtype))
            return jitted(state, client_data, inputs, key)

        round_fn.fn = spied
        return round_fn

    def build_eval_fn(apply_fn, task, **kw):
        evaluate = real_build_eval_fn(apply_fn, task, **kw)

        def spied(params, split):  # runs while the jitted evaluation traces
            seen['test'].append((split['image'].dtype, split['label'].dtype))
            return evaluate(params, split)

        return spied

    monkeypatch.setattr(rounds, 'build_round_fn', build_round_fn)
    monkeypatch.setattr(evaluation, 'build_eval_fn', build_eval_fn)
    c = module.get_config('smoke')
    workdir = tmp_path / 'run'
    summary = train.run(c, str(workdir))
    assert len(seen['train']) == c.num_rounds and seen['test']
    for image, label in seen['train'] + seen['test']:
        assert (image, label) == (image_dtype, np.uint8)
    with open(workdir / 'metrics.jsonl') as f:
        losses = [json.loads(line)['train/loss'] for line in f]
    assert len(losses) == c.num_rounds and losses[-1] < losses[0]
    metric = 'eval/mean_auroc' if module is chestxray14 else 'eval/mean_dice'
    assert np.isfinite(summary['train/loss']) and np.isfinite(summary[metric])
