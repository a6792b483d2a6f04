"""Secure aggregation between the processes of a deployment: each hospital's side and the
server's side of SecAgg(+) (Bonawitz et al., CCS 2017; SecAgg+ neighbourhoods, Bell et al., CCS
2020), without Flower.

The simulation (`aggregation/secagg_protocol.py`) plays every party in one process and draws all
key material from `np.random.default_rng([seed, round])`, so anyone with config.json can redo
it: right for measuring a simulation, wrong for protecting a deployment. Here each hospital draws
its X25519 key pairs (`X25519PrivateKey.generate`), its self-mask seed, its Shamir polynomials and
its nonces from the OS CSPRNG (`os.urandom`) and keeps the private parts in its own process
state; the server sees public keys, ciphertexts it cannot open, masked vectors and, at the end,
the shares it needs to remove the masks of the sum. What is reused from the simulation's
protocol: Shamir sharing over GF(2^127 - 1), the HKDF-SHA256 key agreement, the AES-256-GCM
share encryption, the neighbour graph and the threshold rule; from `aggregation/secure.py`, the
fixed-point scale (`scale_for`), the stochastic encoding into Z_{2^32} and its decoding.

The message rounds of one training round r (what `client_app.py` and `server_app.py` carry):

0. train (advertise keys): the server sends the global parameters; hospital u trains, keeps its
   update, makes two key pairs (c_u for encrypting shares, s_u for masks) and a 32-byte
   self-mask seed b_u, and replies its two public keys and its number of examples (the FedAvg
   weight, public as in the simulation's SecAgg mean).
1. share-keys: the server sends each hospital its neighbours' public keys (the SecAgg+ graph
   over the hospitals that advertised, complete by default) and the threshold t; u Shamir-splits
   b_u and s_u's private key t-of-degree among its neighbours and replies one AES-GCM
   ciphertext per neighbour, under the key agreed from (c_u, c_v), that the server cannot read.
2. masked-input: the server relays each hospital the ciphertexts addressed to it and its weight
   share w_u / W (W: the total weight of the hospitals that shared keys); u encodes
   [w_u / W * update, w_u / W * clip] in Z_{2^32} and adds PRG(b_u) and, for every neighbour v
   that shared keys, +-PRG(s_uv) (+ if u < v), s_uv agreed from (s_u, s_v).
3. unmasking: the server tells each hospital that sent a masked input which of its neighbours
   did (survivors) and which shared keys but did not (dropped); it replies its shares of b_v for
   the survivors and of s_v's private key for the dropped, never both for one hospital, and
   refuses if fewer than t survivors are named. The server rebuilds each survivor's b_v and
   each dropped hospital's mask key, removes the self masks and the dangling pairwise masks, and
   decodes the sum; its last coordinate over clip is the survivors' total weight share, by
   which it divides, as `aggregation/secure_mean.py` does.

PRG: AES-256-CTR (from `cryptography`) keyed with 256-bit HKDF outputs, one key per mask and
round, read as little-endian uint32 words. A round fails (`RoundFailedError`, one line) when a
secret that unmasking needs has fewer than t answering holders.
"""

import math
import os

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_med.aggregation import secagg_protocol as sp
from fedjax_med.aggregation.secagg_protocol import RoundFailedError

__all__ = ['RoundFailedError']

SELF_SEED_BYTES = 32
_SEED_CHUNKS = math.ceil(SELF_SEED_BYTES / sp._CHUNK_BYTES)
_KEY_CHUNKS = sp._KEY_CHUNKS
STAGES = ('share-keys', 'masked-input', 'unmask')


class _OsRandom:
    """What `secagg_protocol.shamir_split` draws its polynomial coefficients from: the OS
    CSPRNG behind the `bytes(n)` a numpy Generator would offer."""

    def bytes(self, n: int) -> bytes:
        return os.urandom(n)


class ProtocolError(RuntimeError):
    """A hospital will not answer a protocol message as asked (the reason is for the server)."""


# -- the PRG ----------------------------------------------------------------------------------


def prg_words(key: bytes, num_words: int) -> np.ndarray:
    """uint32[num_words]: the AES-256-CTR keystream under `key` (32 bytes, used for one mask
    only, so the counter starts at zero), as little-endian words."""
    if len(key) != 32:
        raise ValueError(f'prg_words needs a 256-bit key, got {8 * len(key)} bits.')
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * num_words)) + encryptor.finalize()
    return np.frombuffer(stream, dtype='<u4').astype(np.uint32)


def self_mask_key(seed: bytes, round_index: int) -> bytes:
    """The 256-bit PRG key of a self-mask seed b_u."""
    info = f'fedjax_med/deploy/secagg/round={round_index}/self'.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def _pair_sign(u: int, v: int) -> int:
    return 1 if u < v else -1


# -- fixed-point encoding (aggregation/secure.py's) --------------------------------------------


def scale(clip: float, num_hospitals: int) -> float:
    """The fixed-point scale of the simulation's SecAgg for this federation."""
    from fedjax_med.aggregation import secure

    return secure.scale_for(clip, num_hospitals)


def encode(vector: np.ndarray, *, clip: float, num_hospitals: int) -> np.ndarray:
    """`secure.encode` of a float vector: clipped to [-clip, clip], scaled, stochastically rounded
    into Z_{2^32} (uint32). Its rounding coins come from the OS CSPRNG."""
    import jax

    from fedjax_med.aggregation import secure

    key = jax.random.key(int.from_bytes(os.urandom(4), 'little'))
    out = secure.encode(
        {'v': np.asarray(vector, np.float32)},
        key,
        clip=clip,
        scale=scale(clip, num_hospitals),
    )
    return np.asarray(out['v'], np.uint32)


def decode(total: np.ndarray, *, clip: float, num_hospitals: int) -> np.ndarray:
    """`secure.decode`: a Z_{2^32} sum read as int32 and divided by the scale."""
    from fedjax_med.aggregation import secure

    out = secure.decode({'v': np.asarray(total, np.uint32)}, scale=scale(clip, num_hospitals))
    return np.asarray(out['v'], np.float64)


def flatten(tree) -> np.ndarray:
    """A pytree's leaves as one float32 vector (in the order of `jax.tree.leaves`)."""
    import jax

    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


def unflatten(vector: np.ndarray, like):
    """The pytree of structure `like` whose leaves are consecutive pieces of `vector`."""
    import jax

    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for x in leaves:
        size = int(np.size(x))
        out.append(np.asarray(vector[start : start + size], np.float32).reshape(np.shape(x)))
        start += size
    return jax.tree.unflatten(treedef, out)


# -- the hospital's side -----------------------------------------------------------------------
# Its state between messages is a dict of ints, bytes and lists (client_app.py keeps it in the
# SuperNode's state of this run, at the hospital); the private keys never leave it.


def _private(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def advertise(index: int, round_index: int) -> tuple[dict, dict]:
    """Round 0: new key pairs and self seed from the OS CSPRNG. Returns (state, reply)."""
    cipher_sk, mask_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    state = {
        'index': int(index),
        'round': int(round_index),
        'cipher-sk': sp._private_bytes(cipher_sk),
        'mask-sk': sp._private_bytes(mask_sk),
        'self-seed': os.urandom(SELF_SEED_BYTES),
    }
    reply = {'cipher-pk': sp._public_bytes(cipher_sk), 'mask-pk': sp._public_bytes(mask_sk)}
    return state, reply


def share_keys(state: dict, request: dict) -> tuple[dict, dict]:
    """Round 1: encrypted Shamir shares of b_u and of s_u's private key for each neighbour."""
    u, r = state['index'], state['round']
    if int(request['round']) != r:
        raise ProtocolError(
            f'hospital {u} was asked to share keys for round {int(request["round"]) + 1} '
            f'but advertised keys for round {r + 1}.'
        )
    neighbours = [int(v) for v in request['neighbours']]
    t = int(request['threshold'])
    if u in neighbours or not 1 <= t <= len(neighbours):
        raise ProtocolError(
            f'hospital {u}: threshold {t} with neighbours {neighbours} is not a valid sharing.'
        )
    cipher_sk = _private(state['cipher-sk'])
    xs = [v + 1 for v in neighbours]
    secrets = sp._bytes_to_elements(state['self-seed']) + sp._bytes_to_elements(state['mask-sk'])
    shares = [sp.shamir_split(s, len(neighbours), t, _OsRandom(), xs=xs) for s in secrets]
    ciphertexts = []
    for i, v in enumerate(neighbours):
        plain = sp._share_plaintext(u, v, shares[0][i][1], [s[i][1] for s in shares[1:]])
        nonce = os.urandom(sp._NONCE_BYTES)
        ciphertexts.append(sp._encrypt(cipher_sk, request['cipher-pk'][i], plain, nonce, r))
    state = dict(
        state,
        threshold=t,
        neighbours=neighbours,
        **{'cipher-pks': list(request['cipher-pk']), 'mask-pks': list(request['mask-pk'])},
    )
    return state, {'to': neighbours, 'ciphertexts': ciphertexts}


def masked_input(state: dict, request: dict, update) -> tuple[dict, dict]:
    """Round 2: the weighted update, encoded and masked. `update` is the hospital's own update
    (a pytree of arrays, kept at the hospital since it trained)."""
    u, r, t = state['index'], state['round'], state['threshold']
    senders = [int(v) for v in request['from']]
    if len(senders) < t or not set(senders) <= set(state['neighbours']):
        raise ProtocolError(
            f'hospital {u}: shares came from {senders}, not at least t={t} of its neighbours '
            f'{state["neighbours"]}; it will not send its masked update.'
        )
    share, clip = float(request['share']), float(request['clip'])
    vector = np.append(flatten(update) * share, np.float32(share * clip))
    masked = encode(vector, clip=clip, num_hospitals=int(request['num-hospitals']))
    masked = masked + prg_words(self_mask_key(state['self-seed'], r), masked.size)
    mask_sk = _private(state['mask-sk'])
    for v in senders:
        pk = state['mask-pks'][state['neighbours'].index(v)]
        pair = prg_words(sp.agree(mask_sk, pk, round_index=r), masked.size)
        masked = masked + pair if _pair_sign(u, v) > 0 else masked - pair
    state = dict(state, held={v: ct for v, ct in zip(senders, request['ciphertexts'], strict=True)})
    return state, {'masked': masked.astype(np.uint32)}


def _open_share(state: dict, owner: int) -> list[int]:
    """The field elements of `owner`'s share held here: b chunks, then mask-key chunks."""
    u, r = state['index'], state['round']
    pk = state['cipher-pks'][state['neighbours'].index(owner)]
    plain = sp._decrypt(_private(state['cipher-sk']), pk, state['held'][owner], r)
    ids = (int.from_bytes(plain[i : i + sp.CLIENT_ID_BYTES], 'big') for i in (0, 4))
    if tuple(ids) != (owner, u):
        raise ProtocolError(f'hospital {u}: the share stored for hospital {owner} is not its.')
    return [
        int.from_bytes(plain[i : i + sp.FIELD_BYTES], 'big')
        for i in range(2 * sp.CLIENT_ID_BYTES, len(plain), sp.FIELD_BYTES)
    ]


def unmask(state: dict, request: dict) -> dict:
    """Round 3: shares of b_v for the named survivors, of s_v's key for the named dropped."""
    u = state['index']
    survivors = [int(v) for v in request['survivors'] if int(v) != u]
    dropped = [int(v) for v in request['dropped']]
    held = state.get('held', {})
    if set(survivors) & set(dropped):
        raise ProtocolError(
            f'hospital {u} was asked for both shares of hospital(s) '
            f'{sorted(set(survivors) & set(dropped))}; together they would unmask an update.'
        )
    if len(survivors) + 1 < state['threshold'] or not set(survivors + dropped) <= set(held):
        raise ProtocolError(
            f'hospital {u}: the unmasking request names survivors {survivors} and dropped '
            f'{dropped}, not a valid set for its neighbours {sorted(held)}.'
        )
    owners, kinds, shares = [], [], []
    for v, kind in [(v, 'self') for v in survivors] + [(v, 'mask') for v in dropped]:
        elements = _open_share(state, v)
        part = elements[:_SEED_CHUNKS] if kind == 'self' else elements[_SEED_CHUNKS:]
        owners.append(v)
        kinds.append(kind)
        shares.append(b''.join(e.to_bytes(sp.FIELD_BYTES, 'big') for e in part))
    return {'owners': owners, 'kinds': kinds, 'shares': shares}


# -- the server's side -------------------------------------------------------------------------


def _elements(data: bytes) -> list[int]:
    return [
        int.from_bytes(data[i : i + sp.FIELD_BYTES], 'big')
        for i in range(0, len(data), sp.FIELD_BYTES)
    ]


class ServerRound:
    """The server's side of one round: it relays, sums and unmasks; it holds no private key.

    Args:
      round_index: the training round (0-based).
      keys: {hospital: its advertise reply ('cipher-pk', 'mask-pk')}, the hospitals that trained.
      weights: {hospital: its aggregation weight}, for the same hospitals.
      like: a pytree of the update's structure (the global parameters).
      num_hospitals: the federation's size (sets the fixed-point scale).
      clip: config.secagg.clip; threshold, neighbours: config.secagg's (0: the defaults).
      graph_seed: seeds the neighbour graph, which is public.
    """

    def __init__(
        self,
        round_index: int,
        keys: dict,
        weights: dict,
        like,
        *,
        num_hospitals: int,
        clip: float,
        threshold: int = 0,
        neighbours: int = 0,
        graph_seed=0,
    ):
        self.r, self.keys, self.weights, self.like = round_index, keys, weights, like
        self.num_hospitals, self.clip = num_hospitals, float(clip)
        self.members = sorted(keys)
        m = len(self.members)
        if m < 2:
            raise RoundFailedError(
                f'round {round_index + 1}: secure aggregation needs at least 2 hospitals with '
                f'keys, got {m}.'
            )
        k = None if not neighbours or neighbours >= m - 1 else int(neighbours)
        graph = sp.neighbour_graph(m, k, np.random.default_rng(graph_seed))
        degree = m - 1 if k is None else k
        self.t = degree // 2 + 1 if not threshold else int(threshold)
        if not 1 <= self.t <= degree:
            raise RoundFailedError(
                f'round {round_index + 1}: config.secagg.threshold={threshold} must lie in '
                f'[1, {degree}], the number of neighbours of each of the {m} hospitals.'
            )
        self.nbrs = {
            u: [self.members[j] for j in np.flatnonzero(graph[i])]
            for i, u in enumerate(self.members)
        }
        self.bytes_up = 0  # protocol payloads received (public keys, ciphertexts, shares)

    def _fail(self, line: str) -> None:
        raise RoundFailedError(f'round {self.r + 1}: {line}')

    def share_keys_requests(self) -> dict:
        self.bytes_up += sum(len(v['cipher-pk']) + len(v['mask-pk']) for v in self.keys.values())
        return {
            u: {
                'round': self.r,
                'threshold': self.t,
                'neighbours': self.nbrs[u],
                'cipher-pk': [self.keys[v]['cipher-pk'] for v in self.nbrs[u]],
                'mask-pk': [self.keys[v]['mask-pk'] for v in self.nbrs[u]],
            }
            for u in self.members
        }

    def masked_input_requests(self, replies: dict) -> dict:
        self.shared = sorted(replies)
        if len(self.shared) < self.t:
            self._fail(
                f'only {len(self.shared)} hospitals shared their keys, fewer than the threshold '
                f't={self.t} (config.secagg.threshold); the round cannot be unmasked.'
            )
        inbox = {u: ([], []) for u in self.shared}
        for u in self.shared:
            for v, ct in zip(replies[u]['to'], replies[u]['ciphertexts'], strict=True):
                v = int(v)
                if v in inbox and v in self.nbrs[u]:
                    inbox[v][0].append(u)
                    inbox[v][1].append(ct)
                    self.bytes_up += len(ct)
        total = sum(float(self.weights[u]) for u in self.shared)
        return {
            u: {
                'from': inbox[u][0],
                'ciphertexts': inbox[u][1],
                'share': float(self.weights[u]) / total,
                'clip': self.clip,
                'num-hospitals': self.num_hospitals,
            }
            for u in self.shared
        }

    def unmask_requests(self, replies: dict) -> dict:
        size = flatten(self.like).size + 1
        self.sent = []
        self.total = np.zeros(size, np.uint32)
        for u in sorted(replies):
            masked = np.asarray(replies[u]['masked'], np.uint32)
            if masked.shape != (size,):
                continue  # not a masked input of this model: the hospital counts as dropped
            self.total += masked
            self.sent.append(u)
            self.bytes_up += masked.nbytes
        if not self.sent:
            self._fail('no hospital sent a masked update.')
        shared = set(self.shared)
        return {
            v: {
                'survivors': [u for u in self.nbrs[v] if u in self.sent],
                'dropped': [u for u in self.nbrs[v] if u in shared and u not in self.sent],
            }
            for v in self.sent
        }

    # Long on purpose: the unmasking step reads every answer, rebuilds each secret from its
    # holders' shares and removes its masks in one pass over the same bookkeeping.
    def finish(self, replies: dict):
        """Round 3's answers -> (the survivors' weighted mean update, as a pytree like `like`,
        the survivors)."""
        answered = sorted(replies)
        if len(answered) < self.t:
            self._fail(
                f'only {len(answered)} hospitals answered the unmasking round, fewer than the '
                f'threshold t={self.t} (config.secagg.threshold); the masks cannot be removed.'
            )
        held: dict[tuple[int, str], list] = {}
        for v in answered:
            reply = replies[v]
            for owner, kind, share in zip(
                reply['owners'], reply['kinds'], reply['shares'], strict=True
            ):
                held.setdefault((int(owner), kind), []).append((v + 1, _elements(share)))
                self.bytes_up += len(share)
        total = self.total.copy()
        shared, dropped = set(self.shared), [u for u in self.shared if u not in self.sent]
        wanted = [(u, 'self') for u in self.sent] + [
            (d, 'mask') for d in dropped if any(u in self.sent for u in self.nbrs[d])
        ]
        for owner, kind in wanted:
            shares = held.get((owner, kind), [])
            if len(shares) < self.t:
                self._fail(
                    f'hospital {owner} has {len(shares)} answering neighbours, fewer than the '
                    f'threshold t={self.t} (config.secagg.threshold); its '
                    f'{"self-mask seed" if kind == "self" else "mask key"} cannot be rebuilt.'
                )
            chunks = _SEED_CHUNKS if kind == 'self' else _KEY_CHUNKS
            secret = [sp.shamir_reconstruct([(x, e[c]) for x, e in shares]) for c in range(chunks)]
            if kind == 'self':
                seed = sp._elements_to_bytes(secret, SELF_SEED_BYTES)
                total -= prg_words(self_mask_key(seed, self.r), total.size)
            else:
                mask_sk = _private(sp._elements_to_bytes(secret, sp.PRIVATE_KEY_BYTES))
                for u in self.nbrs[owner]:
                    if u in self.sent and u in shared:
                        agreed = sp.agree(mask_sk, self.keys[u]['mask-pk'], round_index=self.r)
                        pair = prg_words(agreed, total.size)
                        # u added sign(u, owner) * PRG(s_u,owner); take it away.
                        total = total - pair if _pair_sign(u, owner) > 0 else total + pair
        summed = decode(total, clip=self.clip, num_hospitals=self.num_hospitals)
        weight = summed[-1] / self.clip
        if weight <= 0:
            self._fail('the unmasked sum has no weight; the masks were not removed.')
        return unflatten(summed[:-1] / weight, self.like), list(self.sent)


def aggregate(send, server_round: ServerRound):
    """Runs rounds 1-3 of the protocol through `send(stage, {hospital: request}) -> {hospital:
    reply}` (the hospitals that fail or stay silent are absent from the replies). Returns
    `server_round.finish`'s (mean update, survivors)."""
    replies = send('share-keys', server_round.share_keys_requests())
    replies = send('masked-input', server_round.masked_input_requests(replies))
    replies = send('unmask', server_round.unmask_requests(replies))
    return server_round.finish(replies)
