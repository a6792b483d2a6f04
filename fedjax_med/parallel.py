"""Device mesh with one 'clients' axis and the shardings the round uses.

Per-hospital arrays are sharded along their leading client axis; parameters and server state are
replicated. The number of hospitals is padded up to a multiple of the device count with inert
hospitals (no data, weight 0), so the result does not depend on how many devices there are.
"""

import functools
import math
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENTS = 'clients'

# XLA:CPU hands reductions to its YNNPACK library by default (jaxlib 0.10); for the small
# GroupNorm reductions of our models those library calls are slower than XLA's own fused loops:
# a resnet_small hospital update takes 3.9 ms instead of 5.4 ms, a DP-SGD round about 1.5x less
# (BENCHMARKS.md). This keeps YNNPACK for matrix products only. Numbers change at float32
# rounding level (the reductions are summed in another order).
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
}


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()[: num_devices or len(jax.devices())]
    return Mesh(np.array(devices), (CLIENTS,))


def client_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_num_clients(num_clients: int, mesh: Mesh) -> int:
    d = mesh.devices.size
    return int(math.ceil(num_clients / d) * d)


def pad_client_axis(tree, num_padded: int):
    """Pads every leaf's leading axis with zeros up to `num_padded` (numpy, on the host)."""

    def pad(x):
        x = np.asarray(x)
        extra = num_padded - x.shape[0]
        if extra == 0:
            return x
        return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])

    return jax.tree.map(pad, tree)


def put_clients(tree, mesh: Mesh):
    """Places per-hospital arrays on the devices, split along the client axis."""
    return jax.device_put(tree, client_sharding(mesh))


def put_replicated(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def shard_clients(fn, in_axes: tuple, mesh: Mesh | None):
    """`fn` run by each device on its own slice of the client axis (`shard_map`): arguments whose
    entry in `in_axes` is 0 are split along the leading 'clients' axis, those with None are
    replicated, and the outputs are concatenated along it. `fn` itself on one device.

    Used wherever a computation maps over hospitals (or test batches): left to itself, XLA's
    partitioner may gather the whole client axis to every device, e.g. for a `lax.map`.
    """
    if mesh is None or mesh.devices.size == 1:
        return fn
    specs = tuple(P() if ax is None else P(CLIENTS) for ax in in_axes)
    # check_vma=False: replicated values (the shared model) flow into loops whose carries become
    # per-device (per-hospital parameters); the types would differ only in that bookkeeping.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(CLIENTS), check_vma=False)


def round_inputs_sharding(mesh: Mesh, inputs):
    """Shardings for a `RoundInputs`: client axis split, the scalar learning rate replicated."""
    shard = client_sharding(mesh)
    return jax.tree.map(lambda _: shard, inputs).replace(learning_rate=replicated(mesh))


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """XLA options of every program fedjax_med compiles: `CPU_COMPILER_OPTIONS` on a CPU backend
    whose jaxlib knows them (checked once by compiling a tiny program), otherwise none.
    FEDJAX_MED_XLA_DEFAULTS=1 in the environment keeps XLA's defaults (for comparisons)."""
    if jax.default_backend() != 'cpu' or os.environ.get('FEDJAX_MED_XLA_DEFAULTS') == '1':
        return None
    try:
        jax.jit(lambda x: x.sum(), compiler_options=CPU_COMPILER_OPTIONS).lower(
            np.zeros(2, np.float32)
        ).compile()
    except Exception:  # noqa: BLE001 - a jaxlib without the option: XLA's defaults
        return None
    return dict(CPU_COMPILER_OPTIONS)


def jit(fn, **kwargs):
    """`jax.jit` with `compiler_options()`."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


# -------------------------------------------------------------------------------------------------
# Several processes (one per host; `launch/train_multi_gpu.sh`)
# -------------------------------------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run; call before any other JAX call. Every process then sees all
    processes' devices in `jax.devices()`, and `make_mesh` spans them. Arguments left None are
    detected by `jax.distributed.initialize` (SLURM, Open MPI, ...). CPU backends exchange
    collectives through gloo (the test suite runs two CPU processes this way)."""
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def is_primary() -> bool:
    """The process that writes files and prints (process 0; the only one in most runs)."""
    return jax.process_index() == 0


def to_host(tree):
    """Numpy copies of device arrays, including arrays split over other processes' devices (those
    are gathered: every process must call this at the same point)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def to_mesh(tree, sharding):
    """Places host or single-device values with a sharding that may span processes (every
    process passes the same values)."""
    return jax.device_put(jax.tree.map(np.asarray, tree), sharding)


# The persistent compilation cache: a rerun, a resume, a notebook restart or a test run loads the
# round, evaluation and initialisation programs instead of compiling them again.
CACHE_ENV = 'FEDJAX_MED_COMPILATION_CACHE'


def default_compilation_cache_dir() -> str:
    """$FEDJAX_MED_COMPILATION_CACHE, else $XDG_CACHE_HOME/fedjax_med/jax (~/.cache/...)."""
    if os.environ.get(CACHE_ENV) is not None:
        return os.environ[CACHE_ENV]
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'fedjax_med', 'jax')


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None: the default above; ''
    turns it off). JAX_COMPILATION_CACHE_DIR, if set, wins. Returns the folder in use, or None.

    Programs that compiled in under 0.2 s are not stored (reading them back would cost about as
    much). A cache entry is only reused by the same program, JAX version and device kind.
    """
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return os.environ['JAX_COMPILATION_CACHE_DIR']
    directory = default_compilation_cache_dir() if directory is None else directory
    if not directory:
        return None
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', directory)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
    return directory


# ---------------------------------------------------------------------------------------------
# Mapping a per-hospital function over the client axis
# ---------------------------------------------------------------------------------------------


def clients_in_parallel(n: int) -> int:
    """0 = automatic: all hospitals vectorised (vmap) on accelerators; on CPU one at a time,
    because XLA:CPU runs convolutions with a per-hospital kernel (vmap turns them into grouped
    convolutions) several times slower than the same work hospital by hospital."""
    if n:
        return n
    return 1 if jax.default_backend() == 'cpu' else 0


def map_clients(fn: Callable, in_axes: tuple, clients_in_parallel: int, mesh=None) -> Callable:
    """`fn` over the client axis: vmap (clients_in_parallel=0) or `lax.map` in chunks of
    `clients_in_parallel` hospitals. Either way it is one program with the same results.

    With a mesh of several devices, each device maps only its own hospitals (`shard_map` over
    the 'clients' axis); left to itself, XLA's partitioner would gather every hospital's data to
    every device for a `lax.map` and compute all of them everywhere.
    """
    return shard_clients(_map_local(fn, in_axes, clients_in_parallel), in_axes, mesh)


def _map_local(fn: Callable, in_axes: tuple, clients_in_parallel: int) -> Callable:
    if clients_in_parallel == 0:
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args):
        shared = [a if ax is None else None for a, ax in zip(args, in_axes, strict=True)]
        per_client = [a if ax is not None else None for a, ax in zip(args, in_axes, strict=True)]

        def one(xs):
            full = [s if ax is None else x for s, x, ax in zip(shared, xs, in_axes, strict=True)]
            return fn(*full)

        # One at a time: a plain scan, so `lax.cond` inside the local steps really skips a
        # hospital's inactive steps (a batched lax.map would vmap them into selects).
        batch_size = None if clients_in_parallel == 1 else clients_in_parallel
        return jax.lax.map(one, per_client, batch_size=batch_size)

    return mapped
