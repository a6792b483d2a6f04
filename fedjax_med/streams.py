"""Every purpose of randomness in a run, in one place.

All randomness derives from `config.seed`, each use through its own stream, so that no two uses
share random numbers, a resumed run draws what an uninterrupted one would, and a change to one
use never shifts another's draws. Two kinds of stream:

- host (numpy): `np.random.default_rng([seed, ..., PURPOSE, ...])`;
- device (JAX): a branch of the round key, `jax.random.fold_in(round_key(seed, r), KEY_...)`.

Never derive one use's key from another's (`jax.random.split(k, n)[i]` equals `fold_in(k, i)`),
and add a new purpose here with a value no other stream of its kind uses. The values are part of
every run's results: changing one changes the draws of every run that uses it.
"""

import jax

# ---- host, per round: np.random.default_rng([seed, round, PURPOSE, ...]) ----------------------
HOST_PARTICIPANTS = 1  # which m of K hospitals take part (host_round.sample_participants)
HOST_BATCHES = 2  # [seed, round, HOST_BATCHES, hospital]: shuffle / Poisson batches
HOST_SECAGG = 3  # which participants drop out of secure aggregation (aggregation/secagg_host.py)
# The SecAgg protocol's simulated key material is drawn from default_rng([seed, round])
# (aggregation/secagg_protocol.run_protocol).

# ---- host, data (numpy; one draw per dataset, not per round) ----------------------------------
DATA_SYNTHETIC_CXR_META = 0xC0A1  # default_rng([seed, .]): synthetic CXR patients (NIH table)
DATA_SYNTHETIC_CXR = 0xC0A2  # synthetic chest X-ray images
DATA_SYNTHETIC_BRATS = 0xB2A7  # synthetic BraTS volumes
DATA_PARTITION = 0x9A27  # hospitals of the patients (data/partition.py)
DATA_SHIFT_PARAMS = 0xAC91  # [seed, hospital, .]: each hospital's scanner parameters
DATA_SHIFT_NOISE = 0xAC92  # [seed, hospital, .]: the acquisition noise of its images
DATA_TEST_SPLIT = 0x7E57  # each hospital's held-out test patients (data/sources.py)
DATA_PUBLIC = 0x9AB1  # the public patients held out of every hospital
DATA_CASE_SUBSET = 0xCA5E  # data.max_cases: the seeded subset of BraTS cases (tfds_io)
DATA_PATCHES = 0x9A7C  # [seed, ., patient]: 3-D patch centres (data/patches.py)
DATA_CANARIES = 0xCA7A  # config.audit: the canaries' images and labels (data/canaries.py)
DATA_CANARY_IN = 0xCA7B  # config.audit: which canaries are trained on (each with probability 1/2)

# ---- host, analysis of a finished run (numpy; python -m fedjax_med.audit) ---------------------
ANALYSIS_MIA_SUBSET = 0x31A5  # [seed, ., hospital, 1 | 2]: members / non-members attacked

# ---- device: fold_in(round_key, PURPOSE), one branch per use in a round -----------------------
KEY_TRAIN = 0  # local steps: fold_in(., hospital id), then fold_in(., step)
KEY_SECAGG = 1  # SecAgg stochastic rounding of the fixed-point encoding
KEY_CLIENT_DP = 2  # client-level DP noise of the update (split over leaves and hospitals)
KEY_COMPRESS = 3  # update compression: stochastic rounding, rotation signs
KEY_CLIENT_DP_COUNT = 4  # adaptive clipping: noise on the unclipped count

# ---- device, outside the rounds -------------------------------------------------------------
# The model's initial parameters use fold_in(key(seed), 0): the same key as round 0's round key.
# They never draw from the same branch (round 0 only uses fold_in(round_key, KEY_...)), but a
# new use of round 0's key itself must not be added. Kept as it is so that results of earlier
# runs stay reproducible.
INIT_ROUND = 0


def round_key(seed: int, round_index) -> jax.Array:
    """The key of round `round_index`; every device-side draw of the round branches from it."""
    return jax.random.fold_in(jax.random.key(seed), round_index)


def init_key(seed: int) -> jax.Array:
    """The key of the model's initial parameters."""
    return jax.random.fold_in(jax.random.key(seed), INIT_ROUND)
