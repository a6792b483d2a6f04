"""launch/peer_benchmark.py without its peers: it imports and shows its help without torch, its
pure helpers (the twin's parameter count, the summary and its ratios) are exact, and without
torch it exits with status 2. The PyTorch twin itself is checked only where torch is installed
(CI does not install the `peers` extra)."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, 'launch', 'peer_benchmark.py')


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('fedjax_med_peer_benchmark', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def test_help_and_import_need_no_torch(tmp_path):
    # A `torch` package that fails on import: neither --help nor importing the module touches it.
    (tmp_path / 'torch').mkdir()
    (tmp_path / 'torch' / '__init__.py').write_text('raise ImportError("no torch here")\n')
    env = {'PYTHONPATH': f'{tmp_path}{os.pathsep}{REPO}'}
    out = _run('--help', env=env)
    # absl's --help prints the flags and exits with status 1.
    assert out.returncode in (0, 1) and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert '--local_epochs' in out.stdout + out.stderr
    code = f'import importlib.util as u; s = u.spec_from_file_location("b", {SCRIPT!r}); '
    code += 'm = u.module_from_spec(s); s.loader.exec_module(m); print(m.twin_param_count)'
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_missing_peers_exit_2(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, 'missing_packages', lambda names=None: ['torch', 'opacus'])
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['peer_benchmark.py'])
    assert exit_info.value.code == 2


def _flax_count(model_config):
    from fedjax_med.models import build_model

    model = build_model(model_config, 'chestxray14')
    shape = (1, 32, 32, 1)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
    return sum(x.size for x in jax.tree.leaves(params))


def test_twin_param_count_is_the_flax_models(bench):
    from configs import chestxray14

    c = chestxray14.get_config('synthetic')
    arch = bench.twin_architecture(c.model, 14, 1)
    # stem 3*3*1*8 + 16; block 8->8: 2*576 + 32; 8->16: 1152 + 2304 + 128 + 3*32;
    # 16->32: 4608 + 9216 + 512 + 3*64; head 32*14 + 14
    assert bench.twin_param_count(arch) == 19942 == _flax_count(c.model)
    c.model.width, c.model.depth, c.model.norm_groups = 16, 2, 4
    assert bench.twin_param_count(bench.twin_architecture(c.model, 14, 1)) == _flax_count(c.model)
    c.model.name = 'resnet18'
    r18 = bench.twin_param_count(bench.twin_architecture(c.model, 14, 1))
    assert r18 == _flax_count(c.model) == 11_177_422  # ResNet-18, 1 channel in, 14 out
    c.model.name = 'unet'
    with pytest.raises(ValueError, match='ResNets only'):
        bench.twin_architecture(c.model, 3, 4)


def test_summary_medians_and_ratios(bench):
    systems = {
        'fedjax_med': {'round_s': [2.0, 1.0, 3.0], 'examples_per_round': 600.0, 'first_round_s': 9},
        'pytorch': {'round_s': [4.0, 4.0], 'examples_per_round': 600.0, 'first_round_s': 2},
        'flower': {'round_s': [], 'examples_per_round': 600.0, 'first_round_s': None},
    }
    out = bench.summarize(systems, 'fedjax_med')
    s = out['systems']
    assert s['fedjax_med']['median_round_s'] == 2.0
    assert s['fedjax_med']['examples_per_s'] == 300.0
    assert s['pytorch']['examples_per_s'] == 150.0
    assert s['flower']['median_round_s'] is None and s['flower']['examples_per_s'] is None
    assert out['ratios'] == {'fedjax_med_over_pytorch': 2.0}  # no ratio for a system not run
    assert s['fedjax_med']['first_round_s'] == 9


def test_twin_matches_the_flax_model(bench):
    torch = pytest.importorskip('torch')
    sys.path.insert(0, os.path.join(REPO, 'launch'))
    try:
        import peer_torch as pt
    finally:
        sys.path.remove(os.path.join(REPO, 'launch'))
    import numpy as np

    from configs import chestxray14
    from fedjax_med.models import build_model

    c = chestxray14.get_config('synthetic')
    arch = bench.twin_architecture(c.model, 14, 1)
    model = build_model(c.model, 'chestxray14')
    x = np.random.default_rng(0).random((4, 32, 32, 1), np.float32)
    params = model.init(jax.random.PRNGKey(1), x)
    # Perturb the zero-initialised scales so every layer matters.
    params = jax.tree.map(lambda p: p + 0.1, params)
    flat = {
        tuple(k.key for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params['params'])[0]
    }
    twin = pt.build_twin(arch)
    assert pt.num_params(twin) == bench.twin_param_count(arch)
    twin.load_state_dict(pt.flax_to_state_dict(flat))
    with torch.no_grad():
        got = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, np.asarray(model.apply(params, x)), atol=1e-4)
    back = pt.state_dict_to_flax(twin.state_dict(), flat)
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
