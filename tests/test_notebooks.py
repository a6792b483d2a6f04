"""colab/ notebooks: all are valid nbformat and each runs headlessly in its smoke mode."""

import glob
import json
import os
import sys

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO
from tests.test_data_builders import write_nih

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colab', '*.ipynb')))


def test_notebooks_are_valid_and_hold_no_outputs():
    assert [os.path.basename(p) for p in NOTEBOOKS] == [
        '01_quickstart.ipynb',
        '02_privacy_utility.ipynb',
        '03_bring_your_data.ipynb',
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == 'code':
                assert not cell.outputs, f'{path}: commit notebooks without outputs'
                # Notebooks only import fedjax_med: no function or class definitions.
                assert 'def ' not in cell.source and 'class ' not in cell.source, path


def _execute(name, tmp_path, monkeypatch):
    """Runs colab/NAME headlessly in smoke mode, writing under tmp_path/runs; returns it run."""
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_SMOKE', '1')
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_WORKDIR', str(tmp_path / 'runs'))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    # Shell cells (`!python -m fedjax_med...`) use this interpreter even when its environment
    # is not activated.
    monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    nb = nbformat.read(os.path.join(REPO, 'colab', name), as_version=4)
    # Run from the repository root, where `configs` is importable (configs/ is not installed).
    NotebookClient(
        nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': REPO}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == 'code'
        for o in c.outputs
        if o.get('output_type') == 'error'
    ]
    assert not errors, errors
    return nb


def test_quickstart_notebook_runs_with_the_smoke_config(tmp_path, monkeypatch):
    nb = _execute('01_quickstart.ipynb', tmp_path, monkeypatch)
    pngs = os.listdir(tmp_path / 'runs')
    assert 'index.html' in pngs and 'chestxray14_attribution.png' in pngs
    images = [
        o
        for c in nb.cells
        if c.cell_type == 'code'
        for o in c.outputs
        if 'image/png' in o.get('data', {})
    ]
    assert len(images) >= 4


def test_privacy_notebook_runs_with_the_smoke_config(tmp_path, monkeypatch):
    _execute('02_privacy_utility.ipynb', tmp_path, monkeypatch)
    runs = tmp_path / 'runs'
    names = set(os.listdir(runs))
    assert {'nodp', 'eps2.5', 'eps8'} <= names, names
    assert any('privacy_utility' in n for n in names), names
    # Each DP run is calibrated to end within its target.
    for target in (2.5, 8.0):
        summary = json.loads((runs / f'eps{target:g}' / 'summary.json').read_text())
        assert 0.0 < summary['privacy/epsilon'] <= target + 1e-6


def test_bring_your_data_notebook_builds_and_trains_on_the_real_nih_layout(tmp_path, monkeypatch):
    manual = write_nih(tmp_path / 'nih')
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_MANUAL_DIR', str(manual))
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_DATA_DIR', str(tmp_path / 'tfds'))
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_REPO', REPO)
    _execute('03_bring_your_data.ipynb', tmp_path, monkeypatch)
    run = tmp_path / 'runs' / 'nih_chestxray14'
    summary = json.loads((run / 'train' / 'summary.json').read_text())
    assert summary['round'] == 1 and 'eval/mean_auroc' in summary
    assert (run / 'inspect').is_dir() and (run / 'train' / 'index.html').exists()
