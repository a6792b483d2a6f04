"""The NIH-sized twin (configs/chestxray14.py:nih_scale), its public set and warm starts
(`config.init_from`): every row of the NIH table is used once, no public patient is in a hospital,
and a warm-started run starts exactly from the source run's parameters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import chestxray14
from fedjax_med import checkpoint, train
from fedjax_med.data import nih_metadata, sources, synthetic
from fedjax_med.models import build_model
from fedjax_med.validate import ConfigError, validate
from tests.test_config_errors import smoke


def test_every_row_of_the_nih_table_once():
    table = nih_metadata.load_metadata_table()
    n = len(table['patient_id'])
    assert n == 112_120
    rows = synthetic.sample_cxr_metadata(n, 0, max_images_per_patient=0, table=table)
    # Rows come whole patients at a time, in a seeded order: the multiset of (patient,
    # follow-up) pairs is the table's.
    got = np.lexsort((rows['follow_up'], rows['patient_id']))
    want = np.lexsort((table['follow_up'], table['patient_id']))
    np.testing.assert_array_equal(rows['patient_id'][got], table['patient_id'][want])
    np.testing.assert_array_equal(rows['follow_up'][got], table['follow_up'][want])
    np.testing.assert_array_equal(rows['label'][got], table['labels'][want])
    # With the default cap of 4 images per patient the whole table cannot be drawn.
    with pytest.raises(ValueError, match='only yields'):
        synthetic.sample_cxr_metadata(n, 0, table=table)


def test_hold_out_patients_are_whole_patients():
    pids = np.repeat(np.arange(50), np.arange(50) % 4 + 1)
    held, kept = sources.hold_out_patients(pids, 0.2, seed=3)
    assert len(np.unique(pids[held])) == 10  # 20% of 50 patients
    assert not set(pids[held]) & set(pids[kept])
    np.testing.assert_array_equal(np.sort(np.r_[held, kept]), np.arange(len(pids)))
    again, _ = sources.hold_out_patients(pids, 0.2, seed=3)
    np.testing.assert_array_equal(held, again)


def _tiny_nih_scale(variant: str = 'nih_scale'):
    """The NIH-sized twin at 8 px with a few steps per round: every row, little compute."""
    config = chestxray14.get_config(variant)
    config.data.resolution = 8
    config.model.depth = 2
    config.model.norm_groups = 4
    config.local.epochs = 0.002  # about 6 steps of 64 per hospital
    config.num_rounds = 1
    config.eval_every = 1
    config.checkpoint_every = 1
    config.eval_batch_size = 2048
    return config


def test_nih_scale_twin_uses_the_whole_table_and_keeps_the_public_set_apart():
    config = _tiny_nih_scale()
    data = sources.load_federated(config.data, config.seed)
    assert len(data.clients_train) == 5
    sizes = [len(s['patient_id']) for s in data.clients_train + data.clients_test]
    assert sum(sizes) + len(data.public['patient_id']) == 112_120
    assert data.public['image'].dtype == np.uint8
    assert data.clients_train[0]['image'].dtype == np.uint8
    hospital_patients = set(
        np.concatenate([s['patient_id'] for s in data.clients_train + data.clients_test]).tolist()
    )
    public_patients = set(data.public['patient_id'].tolist())
    assert not hospital_patients & public_patients
    assert len(public_patients) == round(0.1 * 30_805)
    # Five hospitals of roughly the real NIH-split-five-ways size (~20,000 images each).
    per_hospital = [
        len(a['patient_id']) + len(b['patient_id'])
        for a, b in zip(data.clients_train, data.clients_test, strict=True)
    ]
    assert all(8_000 < n < 40_000 for n in per_hospital), per_hospital
    assert data.info['public_size'] == len(data.public['patient_id'])


def test_warm_start_from_public_pretraining(tmp_path):
    """nih_public pretrains on the public set alone; nih_scale with init_from starts from it."""
    pretrain = _tiny_nih_scale('nih_public')
    src = str(tmp_path / 'public')
    train.run(pretrain, src)
    state, _ = checkpoint.Checkpointer(os.path.join(src, 'checkpoints')).restore_arrays()

    warm = _tiny_nih_scale()
    warm.init_from = src
    params, round_index, source_config = checkpoint.load_params(src, state['params'])
    assert round_index == 1 and source_config['data']['train_on'] == 'public'
    for a, b in zip(jax_leaves(params), jax_leaves(state['params']), strict=True):
        np.testing.assert_array_equal(a, b)
    # A learning rate of ~0 leaves the warm start where it began: the first evaluation of the
    # warm run is the pretrained model's.
    warm.local.learning_rate = 1e-12
    dst = str(tmp_path / 'warm')
    summary = train.run(warm, dst)
    with open(os.path.join(src, 'metrics.jsonl')) as f:
        source_rows = [json.loads(line) for line in f]
    np.testing.assert_allclose(
        summary['eval/mean_auroc'], source_rows[-1]['eval/mean_auroc'], rtol=0, atol=1e-5
    )
    with open(os.path.join(dst, 'config.json')) as f:
        assert json.load(f)['init_from'] == src


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_init_from_refuses_another_model(tmp_path):
    config = chestxray14.get_config('smoke')
    config.num_rounds = 1
    src = str(tmp_path / 'src')
    train.run(config, src)
    other = config.copy_and_resolve_references()
    other.model.width = 16
    model = build_model(other.model, other.task)
    like = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match=r'init_from.*shape'):
        checkpoint.load_params(src, like)
    with pytest.raises(ValueError, match='no checkpoint'):
        checkpoint.load_params(str(tmp_path), like)


@pytest.mark.parametrize(
    'change, message',
    [
        ({'data.train_on': 'public'}, 'public_fraction > 0'),
        ({'data.train_on': 'public', 'data.public_fraction': 0.1}, "mode='centralized'"),
        ({'data.train_on': 'hospital'}, "'hospitals' or 'public'"),
        ({'data.public_fraction': 1.0}, r'public_fraction=1.0 must be in \[0, 1\)'),
        ({'init_from': '/no/such/run'}, "init_from='/no/such/run' is not a folder"),
    ],
)
def test_config_errors(change, message):
    config = smoke(**{k.replace('.', '__'): v for k, v in change.items()})
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_a_grid_builds_each_dataset_once():
    config = chestxray14.get_config('smoke')
    sources.keep_last_dataset(True)
    try:
        first = sources.load_federated(config.data, 0)
        other_use = config.data.copy_and_resolve_references()
        other_use.train_on = 'public'  # what is trained on, not what the data is
        assert sources.load_federated(other_use, 0) is first
        assert sources.load_federated(config.data, 1) is not first
    finally:
        sources.keep_last_dataset(False)
    assert sources.load_federated(config.data, 0) is not first
