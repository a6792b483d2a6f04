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


def test_long_functions_say_why():
    # docs/ARCHITECTURE.md "Code style": a function of fedjax_med longer than 60 lines carries a
    # comment just above it (or its decorators) saying why it is long.
    import ast
    import pathlib

    missing = []
    for path in sorted(pathlib.Path(REPO, 'fedjax_med').rglob('*.py')):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse('\n'.join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                    above = lines[max(0, start - 4) : start - 1]
                    if not any(line.strip().startswith('#') for line in above):
                        missing.append(f'{path.relative_to(REPO)}:{node.lineno} {node.name}')
    assert not missing, 'long functions without a comment saying why: ' + ', '.join(missing)
