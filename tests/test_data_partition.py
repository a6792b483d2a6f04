"""Partition invariants: disjoint, complete, patient-wise, seeded, skew grows as alpha shrinks."""

import numpy as np
import pytest

from fedjax_med.data import partition


def _toy(n=600, seed=0):
    rng = np.random.default_rng(seed)
    patient = np.sort(rng.integers(0, n // 3, n))  # ~3 images per patient
    labels = (rng.uniform(size=(n, 14)) < np.linspace(0.01, 0.3, 14)).astype(np.float32)
    view = rng.integers(0, 2, n)
    return patient, labels, view


STRATEGY_KW = {
    'iid': {},
    'dirichlet': {'dirichlet_alpha': 0.3},
    'pathological': {'classes_per_client': 3},
    'quantity': {'quantity_sigma': 1.0},
    'natural': {},
}


@pytest.mark.parametrize('strategy', partition.STRATEGIES)
def test_disjoint_complete_patientwise_seeded(strategy):
    patient, labels, view = _toy()
    kw = dict(
        unit_ids=patient, num_clients=5, seed=3, labels=labels, column=view, **STRATEGY_KW[strategy]
    )
    parts = partition.partition_examples(strategy, **kw)
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(patient) and len(np.unique(allidx)) == len(patient)
    owners = [set(patient[p]) for p in parts]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not owners[i] & owners[j]
    again = partition.partition_examples(strategy, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition.partition_examples(strategy, **{**kw, 'seed': 4})
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_increases_as_alpha_decreases():
    patient, labels, _ = _toy(3000)
    _, unit = partition.group_units(patient)
    classes = partition.unit_primary_label(labels, unit, unit.max() + 1)[unit]
    skew = {
        a: np.mean(
            [
                partition.label_skew(
                    partition.partition_examples(
                        'dirichlet',
                        unit_ids=patient,
                        num_clients=5,
                        seed=s,
                        labels=labels,
                        dirichlet_alpha=a,
                    ),
                    classes,
                )
                for s in range(3)
            ]
        )
        for a in (100.0, 1.0, 0.1)
    }
    iid = partition.label_skew(
        partition.partition_examples('iid', unit_ids=patient, num_clients=5, seed=0), classes
    )
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[100.0] < 0.15 and iid < 0.15 and skew[0.1] > 0.4


def test_primary_label_is_rarest_positive_or_no_finding():
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], np.float32)
    # prevalence: class0 .75, class1 .5, class2 .25
    np.testing.assert_array_equal(partition.primary_label(labels), [1, 0, 3, 2])


def test_pathological_hospitals_hold_k_findings():
    patient, labels, _ = _toy(3000)
    parts = partition.partition_examples(
        'pathological', unit_ids=patient, num_clients=5, seed=0, labels=labels, classes_per_client=2
    )
    _, unit = partition.group_units(patient)
    classes = partition.unit_primary_label(labels, unit, unit.max() + 1)[unit]
    for p in parts:
        findings = set(np.unique(classes[p])) - {14}
        assert len(findings) <= 2 + 4  # 2 held + the 4 classes nobody holds when 5 * 2 < 14
    held_somewhere = [set(np.unique(classes[p])) - {14} for p in parts]
    # Held findings are exclusive: most findings appear in exactly one hospital.
    appearances = sum(len(s) for s in held_somewhere)
    assert appearances < 14 + 4 * 4 + 1


def test_quantity_sizes_are_skewed():
    parts = partition.quantity_partition(1000, 5, 1.5, np.random.default_rng(0))
    sizes = sorted(len(p) for p in parts)
    assert sum(sizes) == 1000 and min(sizes) >= 1 and sizes[-1] > 3 * sizes[0]


def test_natural_partition_follows_column():
    values = np.array(['PA'] * 60 + ['AP'] * 40)
    parts = partition.natural_partition(values, 5, np.random.default_rng(0))
    for p in parts:
        assert len(set(values[p])) == 1
    assert sum(1 for p in parts if values[p][0] == 'PA') == 3
    ages = np.arange(100)
    parts = partition.natural_partition(ages, 4, np.random.default_rng(0))
    assert [(ages[p].min(), ages[p].max()) for p in parts] == [
        (0, 24),
        (25, 49),
        (50, 74),
        (75, 99),
    ]


def test_split_train_test_is_patientwise():
    patient = np.repeat(np.arange(50), 4)
    idx = np.arange(200)
    tr, te = partition.split_train_test(idx, patient, 0.2, np.random.default_rng(0))
    assert not set(patient[tr]) & set(patient[te])
    assert len(tr) + len(te) == 200 and len(te) == 40


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match='num_clients'):
        partition.partition_examples('iid', unit_ids=np.arange(3), num_clients=5, seed=0)


@pytest.mark.parametrize('task,channels', [('chestxray14', 1), ('brats', 4)])
def test_acquisition_shift_deterministic_and_differs_by_hospital(task, channels):
    rng = np.random.default_rng(0)
    images = rng.uniform(0.1, 0.9, (3, 16, 16, channels)).astype(np.float32)
    if task == 'brats':
        images[:, :2] = 0.0  # background
    a = partition.apply_acquisition_shift(images, 1, task, seed=0)
    b = partition.apply_acquisition_shift(images, 1, task, seed=0)
    c = partition.apply_acquisition_shift(images, 2, task, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.abs(a - c).mean() > 0.01 and np.abs(a - images).mean() > 0.01
    if task == 'brats':
        assert (a[:, :2] == 0).all()
    else:
        assert a.min() >= 0 and a.max() <= 1
