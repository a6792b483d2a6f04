"""colab/ notebooks: all are valid nbformat; 01_quickstart runs headlessly with the smoke config."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colab', '*.ipynb')))


def test_notebooks_are_valid_and_hold_no_outputs():
    assert [os.path.basename(p) for p in NOTEBOOKS] == [
        '01_quickstart.ipynb', '02_privacy_utility.ipynb', '03_bring_your_data.ipynb']
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == 'code':
                assert not cell.outputs, f'{path}: commit notebooks without outputs'
                # Notebooks only import fedjax_med: no function or class definitions.
                assert 'def ' not in cell.source and 'class ' not in cell.source, path


@pytest.mark.parametrize('name', ['01_quickstart.ipynb'])
def test_notebook_runs_with_the_smoke_config(name, tmp_path, monkeypatch):
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_SMOKE', '1')
    monkeypatch.setenv('FEDJAX_MED_NOTEBOOK_WORKDIR', str(tmp_path / 'runs'))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    nb = nbformat.read(os.path.join(REPO, 'colab', name), as_version=4)
    # Run from the repository root, where `configs` is importable (pip install puts it on path).
    NotebookClient(nb, timeout=300, kernel_name='python3',
                   resources={'metadata': {'path': REPO}}).execute()
    pngs = os.listdir(tmp_path / 'runs')
    assert 'index.html' in pngs and 'chestxray14_attribution.png' in pngs
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
              if 'image/png' in o.get('data', {})]
    assert len(images) >= 4
