"""The repository is `ruff` clean (pyproject.toml's rules) and formatted by `ruff format`, the one
formatter of the tree, as docs/ARCHITECTURE.md asks (section "Code style")."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    out = subprocess.run(
        [sys.executable, '-m', 'ruff', 'check', '--no-cache', REPO],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_changes_nothing():
    out = subprocess.run(
        [sys.executable, '-m', 'ruff', 'format', '--check', '--no-cache', REPO],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
