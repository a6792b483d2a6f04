"""Name registries: each is declared once, and every module that lists the same names agrees with it
(datasets and their tasks, BraTS releases, partition strategies, main metrics, CXR findings)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_med import models, report, tasks, validate
from fedjax_med.aggregation import compression
from fedjax_med.data import nih_metadata, partition, registry, sources, storage
from fedjax_med.validate import ConfigError
from tests.conftest import REPO
from tests.test_config_errors import problems, smoke


@pytest.mark.parametrize('name', registry.DATASETS)
def test_every_dataset_is_accepted_by_validate_and_serves_a_known_task(name):
    task = registry.TASK_OF[name]
    assert task in tasks.TASKS
    validate.validate(smoke(task, data__name=name))


@pytest.mark.parametrize('name', registry.DATASETS)
def test_validate_refuses_a_dataset_with_the_other_task(name):
    other = next(t for t in tasks.TASKS if t != registry.TASK_OF[name])
    msgs = problems(smoke(other, data__name=name))
    assert any(
        m.startswith(f'config.data.name={name!r} is {registry.TASK_OF[name]} data') for m in msgs
    ), msgs


def test_an_unknown_dataset_is_refused_with_the_registered_names():
    (msg,) = [m for m in problems(smoke(data__name='chexpert')) if 'config.data.name=' in m]
    assert msg.startswith(
        "config.data.name='chexpert' is not known; use one of "
        + ', '.join(map(repr, registry.DATASETS))
        + '.'
    )


def test_the_dataset_lists_are_the_registry():
    assert validate.CHOICES['data.name'] == registry.DATASETS
    assert sources.TASK_OF is registry.TASK_OF
    # Every dataset is either a synthetic twin or a real release, not both.
    assert set(registry.SYNTHETIC) | set(registry.REAL) == set(registry.DATASETS)
    assert not set(registry.SYNTHETIC) & set(registry.REAL)
    assert {registry.TASK_OF[v] for v in registry.BRATS_VERSIONS} == {'brats'}
    assert set(registry.BRATS_VERSIONS) <= set(registry.REAL)
    # Each task has exactly one synthetic twin.
    assert sorted(registry.TASK_OF[n] for n in registry.SYNTHETIC) == sorted(tasks.TASKS)


def test_every_dataset_has_a_tfds_builder_and_the_build_command_offers_it(tmp_path):
    from absl import flags

    from fedjax_med.data import brats, build, tfds_io

    assert build._DATASET.name == 'dataset'
    assert tuple(flags.FLAGS['dataset'].parser.enum_values) == registry.REAL + registry.SYNTHETIC
    assert {c.release for c in brats.Brats.BUILDER_CONFIGS} == set(registry.BRATS_VERSIONS)
    for name in registry.DATASETS:
        builder = tfds_io.make_builder(name, data_dir=str(tmp_path), resolution=64)
        assert not tfds_io.is_built(builder), name
    for name in registry.BRATS_VERSIONS + ('synthetic_brats',):
        tfds_io.make_builder(name, data_dir=str(tmp_path), resolution=64, volumes=True)


def test_validate_imports_no_tfds():
    code = (
        'import sys, fedjax_med.validate, fedjax_med.data.registry; '
        "assert 'tensorflow_datasets' not in sys.modules, 'TFDS imported'"
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('strategy', partition.STRATEGIES)
def test_every_partition_strategy_is_accepted_and_implemented(strategy):
    assert validate.CHOICES['data.partition'] == partition.STRATEGIES
    validate.validate(smoke(data__partition=strategy, data__findings_per_client=1))
    rng = np.random.default_rng(0)
    units = np.repeat(np.arange(40), 2)
    labels = (rng.random((len(units), 3)) < 0.3).astype(np.uint8)
    parts = partition.partition_examples(
        strategy,
        unit_ids=units,
        num_clients=4,
        seed=0,
        labels=labels,
        column=units % 2,
        dirichlet_alpha=0.5,
        classes_per_client=1,
        quantity_sigma=0.5,
    )
    assert len(parts) == 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(units)))


def test_an_unknown_partition_is_refused_by_both():
    with pytest.raises(ConfigError, match="config.data.partition='random' is not known"):
        validate.validate(smoke(data__partition='random'))
    with pytest.raises(ValueError, match="Unknown data.partition 'random'"):
        partition.partition_examples('random', unit_ids=np.arange(4), num_clients=2, seed=0)


# ---------------------------------------------------------------------------------------------
# Tasks: names, main metrics, per-task tables, CXR findings
# ---------------------------------------------------------------------------------------------


def test_task_names_are_the_tasks_and_every_per_task_table_covers_them():
    assert validate.CHOICES['task'] == tuple(tasks.TASKS)
    assert set(registry.TASK_OF.values()) == set(tasks.TASKS)
    assert set(models.NUM_OUTPUTS) == set(tasks.TASKS)
    assert set(storage.IMAGE_DTYPES) == set(tasks.TASKS)
    for name, task in tasks.TASKS.items():
        assert task.name == name


@pytest.mark.parametrize('task', list(tasks.TASKS))
def test_the_report_uses_each_tasks_main_metric(task):
    assert report.main_metric(task) == tasks.TASKS[task].main_metric
    assert report.main_metric(task) in report.METRIC_NAME


def test_the_cxr_findings_are_declared_once():
    assert tasks.CXR_LABELS is nih_metadata.CXR_LABELS
    assert models.NUM_OUTPUTS['chestxray14'] == len(nih_metadata.CXR_LABELS) == 14


def test_compression_kinds_are_the_compressors():
    assert validate.CHOICES['compression.kind'] == compression.KINDS
