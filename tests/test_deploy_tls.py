"""The deployment with TLS and SuperNode authentication, over real processes: certificates and
node keys from launch/make_certs.py, a SuperLink with TLS (`--ssl-*`) and
`--enable-supernode-auth`, two SuperNodes whose public keys are registered
(`flwr supernode register`) and one whose key is not. The run completes over TLS with the two,
and the SuperLink refuses the third.

Skipped when flwr is not installed (pip install -e '.[deploy]').
"""

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip('flwr')

from fedjax_med.deploy import __main__ as cli  # noqa: E402
from fedjax_med.deploy import common, local  # noqa: E402

REPO = common.REPO
CONFIG = 'configs/chestxray14.py:smoke'
OVERRIDES = 'data.num_clients=2 num_rounds=1 tensorboard=False'


def make_certs(out: str, nodes: int) -> None:
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'launch', 'make_certs.py'),
            f'--out={out}',
            f'--nodes={nodes}',
        ],
        check=True,
        capture_output=True,
    )


def test_tls_run_completes_and_an_unregistered_node_is_refused(tmp_path):
    certs = str(tmp_path / 'certs')
    make_certs(certs, nodes=3)
    for name in ('ca.crt', 'server.pem', 'server.key', 'hospital_0', 'hospital_2.pub'):
        assert os.path.isfile(os.path.join(certs, name)), name
    assert os.stat(os.path.join(certs, 'server.key')).st_mode & 0o077 == 0
    keys = {k: os.path.join(certs, f'hospital_{k}') for k in range(3)}
    with local.LocalDeployment(
        str(tmp_path / 'deploy'),
        num_hospitals=3,
        port=local.free_port(),
        certs=certs,
        auth_keys=keys,
        unregistered=(2,),
    ) as d:
        intruder = d.supernodes[2]
        status, log = d.run(config=CONFIG, overrides=OVERRIDES, workdir=str(tmp_path / 'server'))
        assert status == 0, log[-3000:]
        assert 'round 1/1 | 2 of 2 hospitals' in log, log[-3000:]
        deadline = time.time() + 120
        while intruder.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert intruder.poll() not in (None, 0)
        with open(os.path.join(d.logs, 'hospital_2.log'), errors='replace') as f:
            assert 'Failed to activate SuperNode' in f.read()
        superlink_args = ' '.join(local.superlink_args(1, certs=certs))
        assert '--insecure' not in superlink_args and '--ssl-certfile' in superlink_args


def test_missing_certificates_are_one_line_errors(tmp_path, capsys):
    status = cli.main(
        ['hospital', '--hospital=0', '--superlink=localhost:1', f'--certs={tmp_path}']
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count('\n') == 1 and '--certs' in err and 'ca.crt' in err
    with pytest.raises(common.DeployError, match='make_certs.py'):
        local.LocalDeployment(str(tmp_path / 'd'), num_hospitals=1, certs=str(tmp_path))
    assert (
        subprocess.run(
            [sys.executable, os.path.join(REPO, 'launch', 'make_certs.py'), '--out=x', '--hosts=,'],
            capture_output=True,
        ).returncode
        == 2
    )
