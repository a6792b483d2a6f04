"""Secure aggregation between deployed processes (fedjax_med/deploy/secagg.py), in one process:
the hospitals' real message handlers (`client_app.secagg_reply` over `wire.to_content`, each
with its own Flower Context state) answer the server's side (`secagg.ServerRound`) through a
`send` that can drop a hospital at any stage. Synthetic updates stand in for training; the run
over real Flower processes is in tests/test_deploy.py.

Checked: the unmasked mean equals the plain weighted mean up to the fixed-point rounding; the
masked vectors the server receives look uniform in Z_{2^32} and not like the updates; a hospital
that drops after sharing keys is recovered when the threshold allows, and the round fails in one
line when it does not; one that drops after sending its masked update stays in the sum; a
hospital never reveals both shares of another; key material differs between two runs of the
same config and seed.
"""

import numpy as np
import pytest

pytest.importorskip('flwr')

from flwr.app import Context, RecordDict  # noqa: E402

from fedjax_med.deploy import client_app, common, secagg, wire  # noqa: E402

NUM = 3
CLIP = 1.0


def make_updates(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {
            'dense': {'kernel': rng.normal(0, 0.05, (40, 30)).astype(np.float32)},
            'bias': rng.normal(0, 0.05, (7,)).astype(np.float32),
        }
        for _ in range(NUM)
    ]


class Federation:
    """NUM hospitals' contexts, the server's side of one round and what the server received."""

    def __init__(self, updates, weights, *, threshold=0, drop=None, round_index=0):
        self.contexts = [
            Context(
                run_id=1,
                node_id=k + 1,
                node_config={'hospital': k},
                state=RecordDict(),
                run_config={},
            )
            for k in range(NUM)
        ]
        self.drop = drop or {}
        self.received: dict[str, dict] = {}
        self.refusals: list[str] = []
        keys = {
            k: client_app.keep_update_for_secagg(self.contexts[k], k, round_index, updates[k])
            for k in range(NUM)
        }
        self.keys = keys
        self.server = secagg.ServerRound(
            round_index,
            keys,
            dict(enumerate(weights)),
            updates[0],
            num_hospitals=NUM,
            clip=CLIP,
            threshold=threshold,
            graph_seed=[0, round_index],
        )

    def send(self, stage: str, requests: dict) -> dict:
        out = {}
        for k, request in requests.items():
            if k in self.drop.get(stage, ()):
                continue
            reply = client_app.secagg_reply(wire.to_content(request, stage=stage), self.contexts[k])
            if 'refused' in reply:
                self.refusals.append(reply['refused']['reason'])
            else:
                out[k] = wire.from_content(reply)
        self.received[stage] = out
        return out

    def run(self):
        return secagg.aggregate(self.send, self.server)


def weighted_mean(updates, weights, members):
    w = np.array([weights[k] for k in members], np.float64)
    w /= w.sum()
    flat = [secagg.flatten(updates[k]).astype(np.float64) for k in members]
    return sum(wk * f for wk, f in zip(w, flat, strict=True))


def tolerance(members: int) -> float:
    # Each hospital's encoded coordinate is off by less than one level (1 / scale), the weight
    # coordinate too, and the sum is divided by a weight share of at least 1 / NUM.
    return 4 * NUM * members / secagg.scale(CLIP, NUM)


def test_secure_mean_equals_the_plain_weighted_mean():
    updates, weights = make_updates(), [10.0, 20.0, 45.0]
    mean, survivors = Federation(updates, weights).run()
    assert survivors == [0, 1, 2]
    error = np.max(np.abs(secagg.flatten(mean) - weighted_mean(updates, weights, survivors)))
    assert error < tolerance(3), error
    assert error > 0  # it went through the fixed-point encoding


def test_the_server_never_receives_an_unmasked_update():
    updates, weights = make_updates(), [10.0, 20.0, 45.0]
    fed = Federation(updates, weights)
    fed.run()
    share = np.array(weights) / sum(weights)
    for k, reply in fed.received['masked-input'].items():
        masked = reply['masked']
        assert masked.dtype == np.uint32
        plain = secagg.flatten(updates[k]) * share[k]
        decoded = secagg.decode(masked, clip=CLIP, num_hospitals=NUM)[:-1]
        assert np.mean(np.abs(decoded - plain) < 1e-3) < 0.01  # not close to the update
        # Uniform in Z_2^32: an encoded update lies within +-2^20 levels of 0 (or of 2^32).
        signed = masked.view(np.int32).astype(np.int64)
        assert np.mean(np.abs(signed) < 2**24) < 0.03
        assert abs(np.mean(masked / 2.0**32) - 0.5) < 0.05
    # What else reached the server: public keys, ciphertexts and field elements, no update.
    for reply in fed.received['share-keys'].values():
        assert all(isinstance(ct, bytes) for ct in reply['ciphertexts'])
    for reply in fed.received['unmask'].values():
        assert sorted(set(reply['kinds'])) == ['self']  # nobody dropped: no mask key revealed


def test_a_hospital_that_drops_after_sharing_keys_is_recovered():
    updates, weights = make_updates(1), [10.0, 20.0, 45.0]
    fed = Federation(updates, weights, threshold=1, drop={'masked-input': {2}})
    mean, survivors = fed.run()
    assert survivors == [0, 1]
    error = np.max(np.abs(secagg.flatten(mean) - weighted_mean(updates, weights, [0, 1])))
    assert error < tolerance(2), error
    # The survivors revealed hospital 2's mask key and each other's self seeds, never both.
    for reply in fed.received['unmask'].values():
        kinds = dict(zip(reply['owners'], reply['kinds'], strict=True))
        assert kinds[2] == 'mask' and 'self' in kinds.values()


def test_a_hospital_that_drops_after_sending_its_masked_update_stays_in_the_sum():
    updates, weights = make_updates(2), [10.0, 20.0, 45.0]
    fed = Federation(updates, weights, threshold=1, drop={'unmask': {2}})
    mean, survivors = fed.run()
    assert survivors == [0, 1, 2]  # its self seed is rebuilt from the others' shares
    error = np.max(np.abs(secagg.flatten(mean) - weighted_mean(updates, weights, survivors)))
    assert error < tolerance(3), error


def test_too_few_survivors_fail_the_round_in_one_line():
    updates, weights = make_updates(), [10.0, 20.0, 45.0]
    fed = Federation(updates, weights, threshold=2, drop={'masked-input': {2}})
    with pytest.raises(secagg.RoundFailedError) as failure:
        fed.run()
    line = str(failure.value)
    assert '\n' not in line and 'round 1:' in line and 'config.secagg.threshold' in line
    assert 'fewer than the threshold t=2' in line


def test_a_hospital_never_reveals_both_shares_of_one_hospital():
    updates, weights = make_updates(), [1.0, 1.0, 1.0]
    fed = Federation(updates, weights)
    fed.send('share-keys', fed.server.share_keys_requests())
    replies = fed.send('masked-input', fed.server.masked_input_requests(fed.received['share-keys']))
    assert len(replies) == NUM
    fed.send('unmask', {0: {'survivors': [1, 2], 'dropped': [2]}})
    assert fed.refusals and 'both shares' in fed.refusals[-1]


def test_key_material_comes_from_the_os_not_the_config():
    config = common.load_config('configs/chestxray14.py:smoke', 'secagg.enabled=True')
    updates, weights = make_updates(), [10.0, 20.0, 45.0]
    first = Federation(updates, weights, round_index=0)
    second = Federation(updates, weights, round_index=0)  # the same run again: same round
    for k in range(NUM):
        assert first.keys[k]['cipher-pk'] != second.keys[k]['cipher-pk']
        assert first.keys[k]['mask-pk'] != second.keys[k]['mask-pk']
        a = first.contexts[k].state['fedjax_med.secagg']['self-seed']
        b = second.contexts[k].state['fedjax_med.secagg']['self-seed']
        assert len(a) == secagg.SELF_SEED_BYTES and a != b
    # The simulation's keys, by contrast, are the config's: the same for the same seed.
    from fedjax_med.aggregation import secagg_protocol

    sim = [secagg_protocol.x25519_keypairs(1, [config.seed, 0])[0][1] for _ in range(2)]
    assert sim[0] == sim[1]
    # And the round's state is deleted once the hospital has answered the unmasking round.
    first.run()
    assert 'fedjax_med.secagg' not in first.contexts[0].state


def test_deploy_refuses_simulated_dropouts():
    config = common.load_config(
        'configs/chestxray14.py:smoke', 'secagg.enabled=True secagg.dropout_fraction=0.3'
    )
    problems = common.deploy_problems(config)
    assert len(problems) == 1 and problems[0].startswith('config.secagg.dropout_fraction=0.3')
