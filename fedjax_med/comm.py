"""Byte accounting of one round: the exact bytes each hospital sends and receives.

Per hospital and round: down = the broadcast model (float32 or bfloat16); up = the update payload
(float32, b-bit quantised levels, or top-k values + indices). With secure aggregation the update
travels as elements of Z_{2^32} (4 bytes per coordinate, plus one for the aggregation weight),
whatever quantisation preceded it; the protocol messages (public keys, encrypted Shamir shares,
unmasking shares) are counted by `aggregation.secagg_host.secagg_round`.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med.aggregation import compression

BROADCAST_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def round_bytes(params, config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(bytes down, bytes up) of the model payloads for one participating hospital."""
    cc = config.compression
    down = compression.broadcast_bytes(params, BROADCAST_DTYPES[cc.broadcast_dtype])
    if config.secagg.enabled:
        num = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
        # One uint32 per coordinate, plus the FedAvg weight share (client-level DP sends none).
        return down, 4 * (num + (config.dp.mode != 'client'))
    return down, compression.bytes_per_update(
        params, kind=cc.kind, bits=cc.bits, topk_fraction=cc.topk_fraction, rotate=cc.rotate
    )
