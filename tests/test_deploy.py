"""The deployment on Flower (fedjax_med/deploy): real processes over loopback, a `flower-superlink`
and one `flower-supernode` per hospital, runs submitted with `flwr run`.

The runs: a 3-hospital smoke config ends with the global parameters of `train.run` of the same
config and seed, and so does one whose ServerApp process is killed (SIGKILL) after its first
checkpoint and started again (it resumes from the checkpoint), and, up to the fixed-point
rounding, one with secure aggregation between the processes (secagg.enabled). Flower starts
one ClientApp process per message, each importing JAX and building its hospital, so on 2 busy
cores a deployed round takes about 30-60 s; the deployment is started once for the module.

Skipped when flwr is not installed (pip install -e '.[deploy]').
"""

import os
import signal
import time

import jax
import numpy as np
import pytest

pytest.importorskip('flwr')

from fedjax_med import checkpoint, train  # noqa: E402
from fedjax_med.deploy import common, hospital, local  # noqa: E402

CONFIG = 'configs/chestxray14.py:smoke'
OVERRIDES = 'data.num_clients=3 num_rounds=2 tensorboard=False'


def final_params(workdir: str):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
    try:
        state, host = ckpt.restore_arrays()
    finally:
        ckpt.close()
    return state['params'], host['round']


def max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture(scope='module')
def simulated(tmp_path_factory):
    """train.run of the same config: its final parameters."""
    workdir = str(tmp_path_factory.mktemp('sim'))
    train.run(common.load_config(CONFIG, OVERRIDES), workdir)
    return final_params(workdir)[0]


@pytest.fixture(scope='module')
def deployment(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('deploy'))
    with local.LocalDeployment(root, num_hospitals=3, port=local.free_port()) as d:
        yield d


def test_deployment_ends_with_the_simulations_parameters(deployment, simulated, tmp_path):
    workdir = str(tmp_path / 'server')
    status, log = deployment.run(config=CONFIG, overrides=OVERRIDES, workdir=workdir)
    assert status == 0, log[-3000:]
    assert 'round 2/2 | 3 of 3 hospitals' in log, log[-3000:]
    params, done = final_params(workdir)
    assert done == 2
    assert max_difference(params, simulated) < 1e-5
    rows = [line for line in open(os.path.join(workdir, 'metrics.jsonl')) if line.strip()]
    assert len(rows) == 2 and '"eval/mean_auroc"' in rows[-1]


def test_killed_server_resumes_from_its_checkpoint(deployment, simulated, tmp_path):
    workdir = str(tmp_path / 'server')
    proc = deployment.run(
        config=CONFIG, overrides=OVERRIDES, workdir=workdir, background=True, name='killed'
    )
    deadline = time.time() + 300
    checkpoints = os.path.join(workdir, 'checkpoints')
    while not (os.path.isdir(os.path.join(checkpoints, '1')) and deployment.serverapp_pids()):
        assert time.time() < deadline and proc.poll() is None, 'no first checkpoint'
        time.sleep(0.2)
    for pid in deployment.serverapp_pids():  # the server process, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert final_params(workdir)[1] == 1  # killed before its second round was saved

    status, log = deployment.run(config=CONFIG, overrides=OVERRIDES, workdir=workdir, name='again')
    assert status == 0, log[-3000:]
    assert 'resumed from the checkpoint of round 1' in log, log[-3000:]
    params, done = final_params(workdir)
    assert done == 2
    assert max_difference(params, simulated) < 1e-5


def test_secure_aggregation_between_processes_matches_the_plain_run(deployment, tmp_path):
    # The hospitals' keys, shares and masked updates travel through the SuperLink and the server
    # unmasks the sum, so the round ends where the plain one does up to the fixed-point rounding:
    # under one level (1 / scale) per hospital and for the weight coordinate, with FedAvg's
    # server learning rate 1. One round: its stochastic rounding, carried through more rounds of
    # training, grows (1.4e-4 after two), and each SecAgg round adds three message rounds.
    from fedjax_med.deploy import secagg

    one_round = OVERRIDES.replace('num_rounds=2', 'num_rounds=1')
    plain = str(tmp_path / 'plain')
    train.run(common.load_config(CONFIG, one_round), plain)
    workdir = str(tmp_path / 'server')
    overrides = one_round + ' secagg.enabled=True'
    status, log = deployment.run(config=CONFIG, overrides=overrides, workdir=workdir, name='sa')
    assert status == 0, log[-3000:]
    assert 'round 1/1 | 3 of 3 hospitals' in log, log[-3000:]
    params, done = final_params(workdir)
    assert done == 1
    difference = max_difference(params, final_params(plain)[0])
    print('secagg deployment vs plain simulation, max |difference|:', difference)
    assert 0 < difference < 2 * (3 + 1) / secagg.scale(1.0, 3)


def test_configs_a_deployment_cannot_run_are_one_line_each():
    config = common.load_config(
        CONFIG,
        'mode=local compression.kind=quantize dp.mode=client attack.mode=sign_flip '
        'attack.num_malicious=1 audit.num_canaries=10',
    )
    problems = common.deploy_problems(config)
    assert len(problems) == 5 and all('\n' not in p for p in problems)
    assert problems[0].startswith("config.mode='local'")
    assert problems[3].startswith("config.attack.mode='sign_flip'")
    assert problems[4].startswith('config.audit.num_canaries=10')
    with pytest.raises(common.DeployError, match='no config field'):
        common.load_config(CONFIG, 'local.nonsense=1')
    with pytest.raises(common.DeployError, match='takes an integer'):
        common.load_config(CONFIG, 'num_rounds=many')
    with pytest.raises(common.DeployError, match='there is no file'):
        common.load_config('configs/nothing.py:smoke')
    with pytest.raises(common.DeployError, match='--hospital=7'):
        hospital.own_data(common.load_config(CONFIG, OVERRIDES), 7)
