"""Golden metrics.jsonl of the BraTS smoke runs (2-D, 3-D, DP-SGD local) (tests/golden_cases.py)."""

import pytest

from fedjax_med import train
from tests import golden_cases

NAMES = [n for n, (task, _) in golden_cases.CASES.items() if task == 'brats']


@pytest.mark.parametrize('name', NAMES)
def test_metrics_equal_the_golden(name, tmp_path):
    workdir = str(tmp_path / name)
    train.run(golden_cases.config_of(name), workdir)
    rows = golden_cases.read_rows(workdir)
    if golden_cases.RECORD:
        golden_cases.record(name, rows)
    assert golden_cases.compare(name, rows) == []
