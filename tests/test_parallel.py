"""parallel.py: the XLA options every program is compiled with."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med import parallel
from fedjax_med.models import build_model


def test_cpu_compiler_options_are_accepted_and_change_only_rounding(monkeypatch, request):
    # This jaxlib knows the option (if a new one drops it, rounds silently get ~1.4x slower on
    # CPUs: this test says so).
    assert jax.default_backend() == 'cpu'
    monkeypatch.delenv('FEDJAX_MED_XLA_DEFAULTS', raising=False)
    parallel.compiler_options.cache_clear()
    request.addfinalizer(parallel.compiler_options.cache_clear)  # later tests: their own env
    assert parallel.compiler_options() == parallel.CPU_COMPILER_OPTIONS

    model = build_model(
        ml_collections.ConfigDict(
            dict(
                name='resnet_small',
                width=8,
                depth=2,
                norm_groups=4,
                compute_dtype='float32',
                negative_slope=0.0,
            )
        ),
        'chestxray14',
    )
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
    params = model.init(jax.random.key(1), x)
    loss = lambda p: jnp.mean(jax.nn.sigmoid(model.apply(p, x)) ** 2)
    fn = jax.value_and_grad(loss)
    with_options = parallel.jit(fn)(params)
    defaults = jax.jit(fn)(params)
    # XLA's default hands the GroupNorm reductions to YNNPACK; the options keep them in XLA.
    count = lambda f: f.lower(params).compile().as_text().count('ynn_fusion')
    assert count(parallel.jit(fn)) < count(jax.jit(fn))
    for a, b in zip(jax.tree.leaves(with_options), jax.tree.leaves(defaults), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_to_host_and_to_mesh_round_trip_on_one_process():
    mesh = parallel.make_mesh()
    tree = {'a': np.arange(6, dtype=np.float32).reshape(3, 2), 'b': np.int32(4)}
    placed = parallel.to_mesh(tree, parallel.replicated(mesh))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed))
    back = parallel.to_host(placed)
    np.testing.assert_array_equal(back['a'], tree['a'])
    assert back['b'] == 4 and parallel.is_primary()
