"""SecAgg(+), host half, once per round for a run's config: which participants drop out, then the
protocol itself (`secagg_protocol.run_protocol`: keys, Shamir shares, byte counts).

The device half, the in-round fixed-point encoding, masking and unmasking, is `secure.py`; the
strategies that use it are `secure_mean.py` and `client_dp_secure_mean.py`.
"""

import math

import ml_collections
import numpy as np

from fedjax_med.streams import HOST_SECAGG  # the dropout generator's purpose


def secagg_round(
    config: ml_collections.ConfigDict, round_index: int, participating: np.ndarray, num_clients: int
):
    """Runs the host half of SecAgg(+) for this round.

    Returns (device inputs, mean protocol bytes up, mean protocol bytes down) per participating
    hospital: a seeded `dropout_fraction` of the participants drop after key agreement and never
    send their masked update.
    """
    # Imported here, so that importing this module does not import cryptography before a
    # config is known to use SecAgg.
    from fedjax_med.aggregation import secagg_protocol

    sa = config.secagg
    rng = np.random.default_rng([config.seed, round_index, HOST_SECAGG])
    dropout = np.zeros_like(participating)
    members = np.flatnonzero(participating[:num_clients])
    n_drop = math.floor(sa.dropout_fraction * len(members))
    dropout[rng.choice(members, n_drop, replace=False)] = True
    setup = secagg_protocol.run_protocol(
        round_index=round_index,
        seed=config.seed,
        participating=participating,
        dropout=dropout,
        threshold=sa.threshold or None,
        neighbours_k=sa.neighbours or None,
    )
    sent = participating.astype(bool)
    up = float(np.mean(setup.bytes_up[sent])) if sent.any() else 0.0
    down = float(np.mean(setup.bytes_down[sent])) if sent.any() else 0.0
    return setup.device_inputs(), up, down
