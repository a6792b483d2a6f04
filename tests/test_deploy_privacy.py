"""Privacy at the site (fedjax_med/deploy/hospital.py): each hospital keeps its own dp-accounting
accountant of exactly the DP-SGD steps it ran, and refuses a round that would take it past its
own budget, whatever the server asks; the server learns its epsilon only as a number.

In process: a hospital's epsilon after a round is the simulation's epsilon of that hospital, its
accountant survives a restart (its state), and one round too many is refused with the reason. Over
real Flower processes: the server asks for a round a hospital cannot afford, the hospital refuses,
the server logs the reason and the round goes on with the others.
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from fedjax_med import experiment, parallel, train
from fedjax_med.deploy import common, hospital

CONFIG = 'configs/chestxray14.py:smoke'
DP = (
    'data.num_clients=2 num_rounds=2 tensorboard=False local.sampling=poisson dp.mode=sample '
    'dp.noise_multiplier=1.0 dp.clip_norm=1.0'
)


@pytest.fixture(scope='module')
def config():
    return common.load_config(CONFIG, DP)


@pytest.fixture(scope='module')
def initial_params(config):
    exp = experiment.build(config, parallel.make_mesh(1))
    return jax.tree.map(np.asarray, exp.params)


def test_hospital_accounts_its_own_steps_and_refuses_past_its_budget(
    config, initial_params, tmp_path
):
    site = hospital.Hospital(config, 1)
    assert site.epsilon() == 0.0
    out = site.update(initial_params, 0)
    one_round = out['epsilon']
    assert isinstance(one_round, float) and one_round > 0
    # The simulation's accountant gives hospital 1 the same epsilon after the same round.
    train.run(config.copy_and_resolve_references(), str(tmp_path / 'sim'), stop_after=1)
    rows = [json.loads(line) for line in open(tmp_path / 'sim' / 'metrics.jsonl')]
    assert rows[0]['privacy/epsilon_per_hospital'][1] == pytest.approx(one_round, rel=1e-9)

    # A budget that one round fits and two do not: the second round is refused, the reason
    # names the hospital, its epsilon and its budget, and nothing is counted.
    budget = one_round * 1.2
    restarted = hospital.Hospital(config, 1, max_epsilon=budget, privacy_state=site.privacy_state())
    assert restarted.epsilon() == pytest.approx(one_round)
    with pytest.raises(hospital.Refused) as refused:
        restarted.update(initial_params, 1)
    reason = str(refused.value)
    assert reason.startswith('hospital 1 refuses: this round would take its epsilon from')
    assert f'past its budget of {budget:g}' in reason and '\n' not in reason
    assert restarted.privacy_state() == site.privacy_state()


@pytest.mark.skipif(
    importlib.util.find_spec('flwr') is None,
    reason="flwr not installed (pip install -e '.[deploy]')",
)
def test_deployed_hospital_refuses_a_round_too_many_and_the_server_logs_it(
    config, initial_params, tmp_path
):
    from fedjax_med.deploy import local

    probe = hospital.Hospital(config, 1)
    one_round = probe.update(initial_params, 0)['epsilon']
    state_dir = str(tmp_path / 'hospital_state')
    options = {1: {'max_epsilon': one_round * 1.2, 'state_dir': state_dir}}
    workdir = str(tmp_path / 'server')
    with local.LocalDeployment(
        str(tmp_path / 'deploy'), num_hospitals=2, port=local.free_port(), node_options=options
    ) as d:
        status, log = d.run(config=CONFIG, overrides=DP, workdir=workdir)
    assert status == 0, log[-3000:]
    assert 'round 2: hospital 1 refuses: this round would take its epsilon from' in log
    assert 'round 2/2 | 1 of 2 hospitals' in log, log[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    assert rows[1]['train/participants'] == [0]
    assert rows[0]['privacy/epsilon_per_hospital'][1] == pytest.approx(one_round, rel=1e-6)
    summary = json.load(open(os.path.join(workdir, 'summary.json')))
    assert any('hospital 1 refuses' in line for line in summary['summary/log'])
    # The hospital's own record: the one round it ran.
    kept = json.load(open(os.path.join(state_dir, 'hospital_1_privacy.json')))
    assert kept['rounds_done'] == 1
