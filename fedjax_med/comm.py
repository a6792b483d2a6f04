"""Communication of one round: the update compressor, secure-aggregation set-up on the host, and
the exact bytes each hospital sends and receives.

Per hospital and round: down = the broadcast model (float32 or bfloat16); up = the update payload
(float32, b-bit quantised levels, or top-k values + indices) plus, with secure aggregation, the
protocol messages (public keys, encrypted Shamir shares, unmasking shares) by their real sizes.
With secure aggregation the update travels as elements of Z_{2^32} (4 bytes per coordinate, plus
one for the aggregation weight), whatever quantisation preceded it.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_med.aggregation import compression, secagg_protocol

BROADCAST_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def make_compressor(cc: ml_collections.ConfigDict):
    """The per-hospital update compressor, or None when updates are sent as float32."""
    if cc.kind == 'none':
        return None
    return compression.compressor(cc.kind, bits=cc.bits, topk_fraction=cc.topk_fraction,
                                  rotate=cc.rotate)


def round_bytes(params, config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(bytes down, bytes up) of the model payloads for one participating hospital."""
    cc = config.compression
    down = compression.broadcast_bytes(params, BROADCAST_DTYPES[cc.broadcast_dtype])
    if config.secagg.enabled:
        num = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
        # One uint32 per coordinate, plus the FedAvg weight share (client-level DP sends none).
        return down, 4 * (num + (config.dp.mode != 'client'))
    return down, compression.bytes_per_update(params, kind=cc.kind, bits=cc.bits,
                                              topk_fraction=cc.topk_fraction, rotate=cc.rotate)


def secagg_round(config: ml_collections.ConfigDict, round_index: int, participating: np.ndarray,
                 num_clients: int):
    """Runs the host half of SecAgg(+) for this round.

    Returns (device inputs, mean protocol bytes up, mean protocol bytes down) per participating
    hospital: a seeded `dropout_fraction` of the participants drop after key agreement and never
    send their masked update.
    """
    sa = config.secagg
    rng = np.random.default_rng([config.seed, round_index, 3])
    dropout = np.zeros_like(participating)
    members = np.flatnonzero(participating[:num_clients])
    n_drop = math.floor(sa.dropout_fraction * len(members))
    dropout[rng.choice(members, n_drop, replace=False)] = True
    setup = secagg_protocol.run_protocol(
        round_index=round_index, seed=config.seed, participating=participating,
        dropout=dropout, threshold=sa.threshold or None, neighbours_k=sa.neighbours or None)
    sent = participating.astype(bool)
    up = float(np.mean(setup.bytes_up[sent])) if sent.any() else 0.0
    down = float(np.mean(setup.bytes_down[sent])) if sent.any() else 0.0
    return setup.device_inputs(), up, down
