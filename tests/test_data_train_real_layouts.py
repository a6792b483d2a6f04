"""A dataset built from files in each real on-disk layout trains for a round through the CLI path
(`train.run`), exactly as a user's downloaded data would."""

import numpy as np
import pytest

from configs import brats, chestxray14
from fedjax_med import train
from tests.test_data_builders import write_brats, write_nih


def test_nih_layout_builds_and_trains_one_round(tmp_path):
    c = chestxray14.get_config('smoke')
    c.data.name = 'nih_chestxray14'
    c.data.manual_dir = str(write_nih(tmp_path / 'nih'))
    c.data.data_dir = str(tmp_path / 'tfds')
    c.data.num_clients = 2
    c.data.partition = 'iid'
    c.num_rounds = 1
    c.local.batch_size = 2
    c.eval_batch_size = 4
    s = train.run(c, str(tmp_path / 'run'))
    assert s['round'] == 1 and np.isfinite(s['train/loss'])
    assert 'eval/mean_auroc' in s and 'eval/accuracy_at_val_threshold' in s


@pytest.mark.parametrize(
    'version,prefix,ext',
    [('brats2021', 'BraTS2021_', '.nii.gz'), ('brats2020', 'BraTS20_Training_', '.nii')],
)
def test_brats_layouts_build_and_train_one_round(tmp_path, version, prefix, ext):
    manual = tmp_path / 'brats'
    manual.mkdir()
    write_brats(manual, prefix, ext)
    c = brats.get_config('smoke')
    c.data.name = version
    c.data.manual_dir = str(manual)
    c.data.data_dir = str(tmp_path / 'tfds')
    c.data.num_clients = 2
    c.data.partition = 'iid'
    c.data.test_fraction = 0.34
    c.num_rounds = 1
    c.local.batch_size = 2
    s = train.run(c, str(tmp_path / 'run'))
    assert s['round'] == 1 and np.isfinite(s['train/loss'])
    assert 0.0 <= s['eval/mean_dice'] <= 1.0
    # Per-case metrics on volumes rebuilt from the slices, grouped by the text case ids.
    assert s['eval/num_cases'] >= 1 and 0.0 <= s['eval/mean_case_dice'] <= 1.0
    assert np.isfinite(s['eval/mean_hd95'])
