"""Secure aggregation (SecAgg / SecAgg+), host side: keys, secret sharing, dropouts, byte counts.

Runs once per round in plain Python/numpy before the jitted round and produces the arrays that
`secure.py` consumes (`RoundSetup.device_inputs()`). It really runs the protocol of Bonawitz et
al. (CCS 2017) in its semi-honest form, restricted to a k-regular neighbour graph as in SecAgg+
(Bell et al., CCS 2020):

0. AdvertiseKeys: every participant makes two X25519 key pairs, (c_u) for encrypting shares and
   (s_u) for masks, and sends both public keys; the server forwards them to u's neighbours.
1. ShareKeys: u draws a self seed b_u and Shamir-splits b_u and its mask private key s_u^SK
   t-of-k among its k neighbours (itself excluded, so each client tolerates the loss of up to
   k - t neighbours); each share is AES-256-GCM encrypted under the key agreed from
   (c_u, c_v) and relayed by the server (the ciphertexts are real, so their sizes are exact).
2. MaskedInputCollection: u masks its update with the pairwise seeds s_uv = HKDF(X25519(s_u,
   s_v)) and PRG(b_u) (done on the device). Clients in `dropout` drop here: they shared keys but
   never send a masked input.
3. Unmasking: the server tells each survivor which neighbours dropped; survivors return their
   shares of b_u for surviving neighbours and of s_v^SK for dropped ones, never both kinds for one
   client. The server rebuilds b_u (survivors) and s_v^SK (dropped), and from s_v^SK the seeds
   s_uv for every surviving neighbour u.

Clients in `late_dropout` sent their masked input but vanish before step 3: their input is in
the sum and their b_u is rebuilt from the others' shares, but they return no shares themselves.

Simulation concessions: one process plays every party, and all randomness (key pairs, b_u, share
polynomials, nonces) comes from a seeded numpy generator so that a run is reproducible
(docs/ARCHITECTURE.md, "Explicit randomness"). A deployment draws it from `os.urandom`/`secrets`,
authenticates the key advertisements (signatures; not modelled, 0 bytes) and runs the consistency
round needed against a malicious server. Byte counts cover protocol messages only (the masked
update itself is counted by `compression.bytes_per_update`): public keys 32 bytes, client ids 4
bytes, field elements 16 bytes, ciphertexts nonce(12) + payload + tag(16).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_med.aggregation.secure import SecAggInputs

# Shamir field: the Mersenne prime 2^127 - 1. Field elements travel as 16 bytes.
PRIME = 2**127 - 1
FIELD_BYTES = 16
# Secrets are cut into 15-byte (120-bit) chunks so that each chunk is a field element.
_CHUNK_BYTES = 15
PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
CLIENT_ID_BYTES = 4
SELF_SEED_BYTES = _CHUNK_BYTES
_NONCE_BYTES = 12

Share = tuple[int, int]


class RoundFailedError(RuntimeError):
    """Secure aggregation cannot finish this round (too many dropouts); the caller decides."""


# ---------------------------------------------------------------------------------------------
# Key agreement
# ---------------------------------------------------------------------------------------------


def x25519_keypairs(
    num: int, rng_seed: int | Sequence[int] | np.random.Generator
) -> list[tuple[X25519PrivateKey, bytes]]:
    """`num` X25519 key pairs (private key, 32-byte raw public key), reproducible from a seed."""
    rng = rng_seed if isinstance(rng_seed, np.random.Generator) else np.random.default_rng(rng_seed)
    pairs = []
    for _ in range(num):
        private = X25519PrivateKey.from_private_bytes(rng.bytes(PRIVATE_KEY_BYTES))
        pairs.append((private, _public_bytes(private)))
    return pairs


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def agree(
    private_u: X25519PrivateKey,
    public_v: bytes,
    *,
    round_index: int = 0,
    purpose: str = 'mask',
    length: int = 32,
) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret; `info` names the round and the purpose.

    Symmetric: agree(sk_u, pk_v) == agree(sk_v, pk_u). Distinct rounds and purposes give
    independent keys from the same key pairs.
    """
    shared = private_u.exchange(X25519PublicKey.from_public_bytes(public_v))
    info = f'fedjax_med/secagg/round={round_index}/{purpose}'.encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


def seed_to_key_words(seed: bytes) -> np.ndarray:
    """First 8 bytes of an HKDF output as the uint32[2] seed of a Threefry mask stream
    (little-endian words)."""
    return np.frombuffer(seed[:8], dtype='<u4').astype(np.uint32)


def _self_key_words(self_seed: int, round_index: int) -> np.ndarray:
    # b_u is a field element; HKDF turns it into PRG key material like the pairwise seeds.
    material = self_seed.to_bytes(FIELD_BYTES, 'big')
    info = f'fedjax_med/secagg/round={round_index}/self'.encode()
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)
    return seed_to_key_words(okm)


# ---------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(2^127 - 1)
# ---------------------------------------------------------------------------------------------


def _field_element(rng: np.random.Generator) -> int:
    # Rejection sampling: uniform on [0, PRIME) from 127 random bits.
    while True:
        value = int.from_bytes(rng.bytes(FIELD_BYTES), 'big') >> 1
        if value < PRIME:
            return value


def shamir_split(
    secret: int, n: int, t: int, rng: np.random.Generator, *, xs: Sequence[int] | None = None
) -> list[Share]:
    """Split `secret` into n shares (x, f(x)); any t of them rebuild it.

    The evaluation points are x = 1..n unless `xs` (n distinct non-zero ints) is given; the
    protocol uses x = receiver index + 1 so that a share's x needs no bytes on the wire.
    """
    if not 0 <= secret < PRIME:
        raise ValueError(f'secret must lie in [0, 2^127 - 1), got {secret}.')
    if not 1 <= t <= n:
        raise ValueError(f'threshold t={t} must satisfy 1 <= t <= n={n}.')
    xs = list(range(1, n + 1)) if xs is None else [int(x) for x in xs]
    if len(xs) != n or len(set(xs)) != n or any(x % PRIME == 0 for x in xs):
        raise ValueError(f'xs must be {n} distinct non-zero evaluation points, got {xs}.')
    coefficients = [secret] + [_field_element(rng) for _ in range(t - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def shamir_reconstruct(shares: Sequence[Share]) -> int:
    """Lagrange interpolation at 0. With fewer than t shares the result is an unrelated value."""
    xs = [x % PRIME for x, _ in shares]
    if not shares or len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError('shamir_reconstruct needs at least one share with distinct, non-zero x.')
    secret = 0
    for i, (x_i, y_i) in enumerate(shares):
        num, den = 1, 1
        for j, (x_j, _) in enumerate(shares):
            if i != j:
                num = num * (-x_j) % PRIME
                den = den * (x_i - x_j) % PRIME
        secret = (secret + y_i * num * pow(den, -1, PRIME)) % PRIME
    return secret


def _bytes_to_elements(data: bytes) -> list[int]:
    return [
        int.from_bytes(data[i : i + _CHUNK_BYTES], 'big') for i in range(0, len(data), _CHUNK_BYTES)
    ]


def _elements_to_bytes(elements: Sequence[int], length: int) -> bytes:
    sizes = [min(_CHUNK_BYTES, length - i) for i in range(0, length, _CHUNK_BYTES)]
    return b''.join(e.to_bytes(size, 'big') for e, size in zip(elements, sizes, strict=True))


_KEY_CHUNKS = math.ceil(PRIVATE_KEY_BYTES / _CHUNK_BYTES)


# ---------------------------------------------------------------------------------------------
# SecAgg+ neighbour graph
# ---------------------------------------------------------------------------------------------


def neighbour_graph(num_clients: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Random k-regular symmetric graph without self loops, bool[K, K].

    As in SecAgg+, a Harary graph H(k, K) (each node joined to its k/2 nearest nodes on either side
    of a ring, plus the opposite node when k is odd) with randomly permuted node labels.
    k=None or k = K-1 gives the complete graph.
    """
    if k is None or k == num_clients - 1:
        return ~np.eye(num_clients, dtype=bool)
    if not 1 <= k < num_clients:
        raise ValueError(
            f'neighbours_k={k} must satisfy 1 <= k < number of clients ({num_clients}); '
            'use None for the complete graph.'
        )
    if (num_clients * k) % 2:
        raise ValueError(
            f'no {k}-regular graph on {num_clients} clients exists (K*k is odd); '
            'use an even neighbours_k.'
        )
    ring = np.zeros((num_clients, num_clients), dtype=bool)
    nodes = np.arange(num_clients)
    for offset in range(1, k // 2 + 1):
        ring[nodes, (nodes + offset) % num_clients] = True
        ring[(nodes + offset) % num_clients, nodes] = True
    if k % 2:
        ring[nodes, (nodes + num_clients // 2) % num_clients] = True
    perm = rng.permutation(num_clients)
    graph = np.zeros_like(ring)
    graph[np.ix_(perm, perm)] = ring
    return graph


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RoundSetup:
    """Everything one round of secure aggregation hands to the device, plus its costs.

    Arrays are indexed by the full client axis K; clients that did not participate have zero
    rows. `bytes_up`/`bytes_down` count protocol messages per client (not the masked update).
    """

    pair_keys: np.ndarray  # uint32[K, K, 2]
    pair_signs: np.ndarray  # int32[K, K]
    self_keys: np.ndarray  # uint32[K, 2]
    survivor: np.ndarray  # float32[K]: sent a masked input
    recovered_self_keys: np.ndarray  # uint32[K, 2]
    recovered_pair_keys: np.ndarray  # uint32[K, K, 2]
    bytes_up: np.ndarray  # int64[K]
    bytes_down: np.ndarray  # int64[K]
    neighbours: np.ndarray  # bool[K, K]
    threshold: int
    reconstructed_self: np.ndarray  # bool[K]: the server rebuilt b_u
    reconstructed_mask_key: np.ndarray  # bool[K]: the server rebuilt s_u^SK

    def device_inputs(self) -> SecAggInputs:
        return SecAggInputs(
            pair_keys=self.pair_keys,
            pair_signs=self.pair_signs,
            self_keys=self.self_keys,
            survivor=self.survivor,
            recovered_self_keys=self.recovered_self_keys,
            recovered_pair_keys=self.recovered_pair_keys,
        )


@dataclasses.dataclass
class _Client:
    """A participant's protocol state; it never reveals both share kinds of one neighbour."""

    index: int
    cipher_sk: X25519PrivateKey
    mask_sk: X25519PrivateKey
    self_seed: int
    held: dict[int, bytes] = dataclasses.field(default_factory=dict)  # sender -> ciphertext
    revealed: dict[int, str] = dataclasses.field(default_factory=dict)

    def reveal(
        self, owner: int, kind: str, owner_cipher_pk: bytes, round_index: int
    ) -> list[Share]:
        """Decrypt the shares `owner` sent: its b-share (kind 'self') or key shares ('mask')."""
        if self.revealed.setdefault(owner, kind) != kind:
            raise AssertionError(
                f'client {self.index} was asked for both share kinds of client {owner}; '
                'together they would unmask its update.'
            )
        plain = _decrypt(self.cipher_sk, owner_cipher_pk, self.held[owner], round_index)
        sender, receiver = (int.from_bytes(plain[i : i + 4], 'big') for i in (0, 4))
        if (sender, receiver) != (owner, self.index):
            raise AssertionError(f'share of {sender}->{receiver} stored as {owner}->{self.index}')
        elements = [
            int.from_bytes(plain[i : i + FIELD_BYTES], 'big')
            for i in range(2 * CLIENT_ID_BYTES, len(plain), FIELD_BYTES)
        ]
        x = self.index + 1
        return [(x, elements[0])] if kind == 'self' else [(x, e) for e in elements[1:]]


def _share_plaintext(sender: int, receiver: int, self_share: int, key_shares: list[int]) -> bytes:
    # u || v || share of b_u || shares of the mask private key, as in Bonawitz et al.
    fields = [self_share, *key_shares]
    return (
        sender.to_bytes(CLIENT_ID_BYTES, 'big')
        + receiver.to_bytes(CLIENT_ID_BYTES, 'big')
        + b''.join(f.to_bytes(FIELD_BYTES, 'big') for f in fields)
    )


def _encrypt(
    sk: X25519PrivateKey, pk: bytes, plain: bytes, nonce: bytes, round_index: int
) -> bytes:
    key = agree(sk, pk, round_index=round_index, purpose='share-encryption')
    return nonce + AESGCM(key).encrypt(nonce, plain, None)


def _decrypt(sk: X25519PrivateKey, pk: bytes, ciphertext: bytes, round_index: int) -> bytes:
    key = agree(sk, pk, round_index=round_index, purpose='share-encryption')
    return AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], None)


def _as_mask(name: str, value: np.ndarray | None, num_clients: int) -> np.ndarray:
    if value is None:
        return np.zeros(num_clients, dtype=bool)
    value = np.asarray(value, dtype=bool)
    if value.shape != (num_clients,):
        raise ValueError(f'{name} must have shape ({num_clients},), got {value.shape}.')
    return value


def _empty_setup(num_clients: int, threshold: int) -> RoundSetup:
    return RoundSetup(
        pair_keys=np.zeros((num_clients, num_clients, 2), np.uint32),
        pair_signs=np.zeros((num_clients, num_clients), np.int32),
        self_keys=np.zeros((num_clients, 2), np.uint32),
        survivor=np.zeros(num_clients, np.float32),
        recovered_self_keys=np.zeros((num_clients, 2), np.uint32),
        recovered_pair_keys=np.zeros((num_clients, num_clients, 2), np.uint32),
        bytes_up=np.zeros(num_clients, np.int64),
        bytes_down=np.zeros(num_clients, np.int64),
        neighbours=np.zeros((num_clients, num_clients), bool),
        threshold=threshold,
        reconstructed_self=np.zeros(num_clients, bool),
        reconstructed_mask_key=np.zeros(num_clients, bool),
    )


# Long on purpose: the protocol's rounds (advertise keys, share keys, masked input, unmasking)
# run in order over the same parties, as in Bonawitz et al. 2017; split, their state would
# have to travel between functions.
def run_protocol(
    *,
    round_index: int,
    seed: int,
    participating: np.ndarray,
    dropout: np.ndarray,
    threshold: int | None = None,
    neighbours_k: int | None = None,
    late_dropout: np.ndarray | None = None,
) -> RoundSetup:
    """Run one round of SecAgg(+) among the participating clients and return the device inputs.

    Args:
      round_index: names the round in every HKDF `info`, so keys never repeat across rounds.
      seed: run seed; with `round_index` it seeds all protocol randomness (reproducible).
      participating: bool[K], clients sampled this round; the others take no part at all.
      dropout: bool[K] (subset of participating), clients that share keys but never send their
        masked input.
      threshold: Shamir threshold t; default floor(degree / 2) + 1 (honest majority).
      neighbours_k: SecAgg+ degree k (even); None, or k >= participants - 1, is the complete
        graph of classic SecAgg.
      late_dropout: bool[K] (subset of participating and not of dropout), clients that send their
        masked input and then vanish before unmasking (they return no shares).

    Raises:
      ValueError: inconsistent masks or an impossible threshold / degree.
      RoundFailedError: too few clients left to rebuild a secret that unmasking needs.
    """
    participating = np.asarray(participating, dtype=bool)
    num_clients = participating.shape[0]
    dropout = _as_mask('dropout', dropout, num_clients)
    late_dropout = _as_mask('late_dropout', late_dropout, num_clients)
    if np.any(dropout & ~participating):
        raise ValueError('dropout must be a subset of participating.')
    if np.any(late_dropout & ~(participating & ~dropout)):
        raise ValueError('late_dropout must be a subset of the participants that did not drop.')

    members = [int(u) for u in np.flatnonzero(participating)]
    if not members:
        return _empty_setup(num_clients, threshold or 0)
    if len(members) < 2:
        raise RoundFailedError(
            f'round {round_index}: secure aggregation needs at least 2 participating clients, '
            f'got {len(members)}.'
        )
    rng = np.random.default_rng([seed, round_index])
    setup = _empty_setup(num_clients, 0)

    # --- SecAgg+ graph over the participants -----------------------------------------------
    local_k = None if neighbours_k is None or neighbours_k >= len(members) - 1 else neighbours_k
    local = neighbour_graph(len(members), local_k, rng)
    setup.neighbours[np.ix_(members, members)] = local
    degree = len(members) - 1 if local_k is None else local_k
    t = degree // 2 + 1 if threshold is None else threshold
    if not 1 <= t <= degree:
        raise ValueError(
            f'threshold={threshold}: must lie in [1, {degree}], the number of neighbours each of '
            f'the {len(members)} participants shares its secrets with.'
        )
    setup.threshold = t
    nbrs = {u: [int(v) for v in np.flatnonzero(setup.neighbours[u])] for u in members}

    # --- Round 0: AdvertiseKeys ------------------------------------------------------------
    cipher_keys = x25519_keypairs(len(members), rng)
    mask_keys = x25519_keypairs(len(members), rng)
    clients: dict[int, _Client] = {}
    cipher_pk: dict[int, bytes] = {}
    mask_pk: dict[int, bytes] = {}
    for u, (c_sk, c_pk), (s_sk, s_pk) in zip(members, cipher_keys, mask_keys, strict=True):
        self_seed = int.from_bytes(rng.bytes(SELF_SEED_BYTES), 'big')
        clients[u] = _Client(u, c_sk, s_sk, self_seed)
        cipher_pk[u], mask_pk[u] = c_pk, s_pk
        setup.bytes_up[u] += 2 * PUBLIC_KEY_BYTES
    for u in members:
        setup.bytes_down[u] += len(nbrs[u]) * (CLIENT_ID_BYTES + 2 * PUBLIC_KEY_BYTES)

    # --- Round 1: ShareKeys (encrypted, relayed by the server) ------------------------------
    for u in members:
        client = clients[u]
        xs = [v + 1 for v in nbrs[u]]
        self_shares = shamir_split(client.self_seed, degree, t, rng, xs=xs)
        key_chunks = _bytes_to_elements(_private_bytes(client.mask_sk))
        chunk_shares = [shamir_split(c, degree, t, rng, xs=xs) for c in key_chunks]
        for i, v in enumerate(nbrs[u]):
            plain = _share_plaintext(u, v, self_shares[i][1], [s[i][1] for s in chunk_shares])
            ciphertext = _encrypt(
                client.cipher_sk, cipher_pk[v], plain, rng.bytes(_NONCE_BYTES), round_index
            )
            clients[v].held[u] = ciphertext
            setup.bytes_up[u] += CLIENT_ID_BYTES + len(ciphertext)
            setup.bytes_down[v] += CLIENT_ID_BYTES + len(ciphertext)

    # Pairwise and self mask seeds, each computed by the client that uses it.
    for u in members:
        for v in nbrs[u]:
            seed_uv = agree(clients[u].mask_sk, mask_pk[v], round_index=round_index)
            setup.pair_keys[u, v] = seed_to_key_words(seed_uv)
            setup.pair_signs[u, v] = 1 if u < v else -1
        setup.self_keys[u] = _self_key_words(clients[u].self_seed, round_index)

    # --- Round 2: MaskedInputCollection (the masked update itself is sent on the device) -----
    sent = participating & ~dropout
    setup.survivor = sent.astype(np.float32)
    responders = [u for u in members if sent[u] and not late_dropout[u]]

    # --- Round 3: Unmasking ---------------------------------------------------------------
    if len(responders) < t:
        raise RoundFailedError(
            f'round {round_index}: only {len(responders)} clients answered the unmasking round, '
            f'fewer than the threshold t={t}; the masks cannot be removed.'
        )
    for v in responders:
        setup.bytes_down[v] += len(nbrs[v]) * CLIENT_ID_BYTES  # which neighbours sent
    dropped = [u for u in members if not sent[u]]
    wanted = {u: 'self' for u in members if sent[u]}
    for v in dropped:
        if any(sent[u] for u in nbrs[v]):  # only dangling pairwise masks need the key
            wanted[v] = 'mask'
    for owner, kind in wanted.items():
        holders = [v for v in nbrs[owner] if v in responders]
        if len(holders) < t:
            raise RoundFailedError(
                f'round {round_index}: client {owner} has {len(holders)} answering neighbours, '
                f'fewer than the threshold t={t}; its {kind} secret cannot be rebuilt.'
            )
        shares = [clients[v].reveal(owner, kind, cipher_pk[owner], round_index) for v in holders]
        for v in holders:
            payload = FIELD_BYTES if kind == 'self' else _KEY_CHUNKS * FIELD_BYTES
            setup.bytes_up[v] += CLIENT_ID_BYTES + payload
        if kind == 'self':
            self_seed = shamir_reconstruct([s[0] for s in shares])
            setup.recovered_self_keys[owner] = _self_key_words(self_seed, round_index)
            setup.reconstructed_self[owner] = True
        else:
            chunks = [shamir_reconstruct([s[c] for s in shares]) for c in range(_KEY_CHUNKS)]
            mask_sk = X25519PrivateKey.from_private_bytes(
                _elements_to_bytes(chunks, PRIVATE_KEY_BYTES)
            )
            for u in nbrs[owner]:
                if sent[u]:
                    words = seed_to_key_words(agree(mask_sk, mask_pk[u], round_index=round_index))
                    setup.recovered_pair_keys[u, owner] = words
                    setup.recovered_pair_keys[owner, u] = words
            setup.reconstructed_mask_key[owner] = True
    assert not np.any(setup.reconstructed_self & setup.reconstructed_mask_key), (
        'the server rebuilt both secrets of one client'
    )
    return setup
