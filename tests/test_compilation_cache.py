"""The persistent compilation cache that main.py turns on by default: where it goes, how it is
turned off, and that JAX_COMPILATION_CACHE_DIR wins. Each case runs in a fresh process (the
cache is process-wide JAX configuration)."""

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

CODE = textwrap.dedent("""
    import sys, jax
    from fedjax_med import parallel
    arg = None if sys.argv[1] == 'None' else sys.argv[1]
    print(parallel.enable_compilation_cache(arg))
    print(jax.config.jax_compilation_cache_dir)
""")


def _run(arg: str, **env_changes) -> list[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ('JAX_COMPILATION_CACHE_DIR', 'FEDJAX_MED_COMPILATION_CACHE')
    }
    env.update(env_changes, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
    out = subprocess.run(
        [sys.executable, '-c', CODE, arg],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split('\n')[:2]


@pytest.mark.parametrize(
    'arg, env, expected',
    [
        ('None', {'XDG_CACHE_HOME': '{tmp}'}, '{tmp}/fedjax_med/jax'),  # the default folder
        ('{tmp}/mine', {}, '{tmp}/mine'),  # --compilation_cache=DIR
        ('None', {'FEDJAX_MED_COMPILATION_CACHE': '{tmp}/env'}, '{tmp}/env'),
        ('', {}, 'None'),  # turned off
        ('None', {'FEDJAX_MED_COMPILATION_CACHE': ''}, 'None'),  # turned off by the env
    ],
)
def test_where_the_cache_goes(tmp_path, arg, env, expected):
    fill = lambda s: s.format(tmp=tmp_path)
    returned, configured = _run(fill(arg), **{k: fill(v) for k, v in env.items()})
    assert returned == fill(expected)
    assert configured == fill(expected)
    if expected != 'None':
        assert os.path.isdir(fill(expected))


def test_jax_compilation_cache_dir_wins(tmp_path):
    returned, _ = _run(str(tmp_path / 'ours'), JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax'))
    assert returned == str(tmp_path / 'jax')
    assert not (tmp_path / 'ours').exists()
