"""Device mesh with one 'clients' axis and the shardings the round uses.

Per-hospital arrays are sharded along their leading client axis; parameters and server state are
replicated. The number of hospitals is padded up to a multiple of the device count with inert
hospitals (no data, weight 0), so the result does not depend on how many devices there are.
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENTS = 'clients'


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


def round_inputs_sharding(mesh: Mesh, inputs):
    """Shardings for a `RoundInputs`: client axis split, the scalar learning rate replicated."""
    shard = client_sharding(mesh)
    return jax.tree.map(lambda _: shard, inputs).replace(learning_rate=replicated(mesh))
