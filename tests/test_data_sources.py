"""load_federated on the synthetic twins: the interface the training engine consumes."""

import sys

import ml_collections
import numpy as np
import pytest

from fedjax_med.data import sources


def _config(name, **kw):
    c = ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir='',
            manual_dir='',
            resolution=16,
            num_train=240,
            num_test=60,
            num_clients=3,
            partition='dirichlet',
            dirichlet_alpha=0.5,
            findings_per_client=3,
            quantity_sigma=1.0,
            natural_column='view',
            feature_skew=True,
            test_fraction=0.2,
            slices_per_case=6,
        )
    )
    c.update(kw)
    return c


def _check_common(ds, k):
    assert len(ds.clients_train) == len(ds.clients_test) == len(ds.client_names) == k
    train_p = [set(d['patient_id']) for d in ds.clients_train]
    test_p = [set(d['patient_id']) for d in ds.clients_test]
    for i in range(k):
        assert not train_p[i] & test_p[i]
        for j in range(k):
            if i != j:
                assert not (train_p[i] | test_p[i]) & (train_p[j] | test_p[j])
    assert len(ds.test['label']) == sum(len(d['label']) for d in ds.clients_test)
    image_dtype = {'chestxray14': np.uint8, 'brats': np.float16}[ds.task]  # compact storage
    for d in [*ds.clients_train, *ds.clients_test, ds.test]:
        assert d['image'].dtype == image_dtype and d['label'].dtype == np.uint8
        assert d['patient_id'].dtype == np.int64
        assert all(len(v) == len(d['label']) for v in d.values())


@pytest.mark.parametrize('partition', ['iid', 'dirichlet', 'pathological', 'quantity', 'natural'])
def test_synthetic_cxr(partition):
    ds = sources.load_federated(_config('synthetic_cxr', partition=partition), seed=0)
    assert ds.task == 'chestxray14'
    _check_common(ds, 3)
    assert ds.clients_train[0]['image'].shape[1:] == (16, 16, 1)
    assert ds.clients_train[0]['label'].shape[1:] == (14,)
    total = sum(len(d['label']) for d in [*ds.clients_train, *ds.clients_test])
    assert total == 300
    assert 30 <= len(ds.test['label']) <= 90
    assert ds.info['label_names'][0] == 'Atelectasis'
    assert np.asarray(ds.info['client_train_label_counts']).shape == (3, 14)
    if partition == 'natural':
        # Hospitals follow each patient's majority view, so each is (almost) single-view.
        for d in ds.clients_train:
            assert max(np.mean(d['view'] == 0), np.mean(d['view'] == 1)) > 0.8


def test_synthetic_brats():
    ds = sources.load_federated(_config('synthetic_brats', num_train=120, num_test=30), seed=0)
    assert ds.task == 'brats'
    _check_common(ds, 3)
    d = ds.clients_train[0]
    assert d['image'].shape[1:] == (16, 16, 4) and d['label'].shape[1:] == (16, 16, 3)
    assert set(np.unique(d['label'])) <= {0.0, 1.0}
    assert 'case_id' in d and 'slice_index' in d


def test_seeded_and_feature_skew_changes_images():
    a = sources.load_federated(_config('synthetic_cxr'), seed=0)
    b = sources.load_federated(_config('synthetic_cxr'), seed=0)
    c = sources.load_federated(_config('synthetic_cxr', feature_skew=False), seed=0)
    np.testing.assert_array_equal(a.test['image'], b.test['image'])
    np.testing.assert_array_equal(a.test['patient_id'], c.test['patient_id'])
    assert not np.array_equal(a.test['image'], c.test['image'])


def test_bad_name_and_column_are_clear_errors():
    with pytest.raises(ValueError, match='data.name'):
        sources.load_federated(_config('cifar'), seed=0)
    with pytest.raises(ValueError, match='natural_column'):
        sources.load_federated(
            _config('synthetic_cxr', partition='natural', natural_column='hospital_name'), seed=0
        )


def test_no_tensorflow_imported():
    sources.load_federated(_config('synthetic_cxr'), seed=0)
    assert 'tensorflow' not in sys.modules
