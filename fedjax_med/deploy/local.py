"""Starting the processes of a deployment: a Flower SuperLink (the server's side), one Flower
SuperNode per hospital, and `flwr run` of fedjax_med's Flower app (fedjax_med/deploy/flower_app/).

Each process is Flower's own command (`flower-superlink`, `flower-supernode`, `flwr`), from the
environment of this Python. The SuperLink serves everything on one port (the SuperNodes' Fleet
API, `flwr run`'s Control API and the ServerApp's runtime); each SuperNode also opens a local
runtime port for its ClientApp processes. `flwr run` reads the SuperLink's address from
`FLWR_HOME/config.toml`, which `write_connection` writes.

`LocalDeployment` runs all of it on one machine over loopback (the demo and the tests):

    with LocalDeployment(root, num_hospitals=3) as d:
        d.run(config='configs/chestxray14.py:smoke', overrides='data.num_clients=3',
              workdir=root + '/server')

Runtime dependency installation (`uv sync` of the app's dependencies) is turned off: fedjax_med
and Flower are installed on every machine (pip install -e '.[deploy]').
"""

import os
import signal
import socket
import subprocess
import sys
import time

from fedjax_med.deploy.common import REPO, DeployError

APP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'flower_app')
DEFAULT_PORT = 9093
# What launch/make_certs.py writes and the SuperLink reads with TLS on.
CERT_FILES = ('ca.crt', 'server.pem', 'server.key')
# The SuperNodes' ClientApp runtime ports on one machine: BASE + hospital.
SUPERNODE_BASE_PORT = 9200


def command(name: str) -> str:
    """The path of Flower's command `name` in this Python's environment (else on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(here):
        return here
    import shutil

    found = shutil.which(name)
    if not found:
        raise DeployError(
            f'{name} not found: Flower is not installed here; run '
            "pip install -e '.[deploy]' (flwr)."
        )
    return found


def child_env(flwr_home: str | None = None) -> dict:
    """The environment of the deployment's processes: this Python's commands first on PATH,
    fedjax_med importable (this checkout first on PYTHONPATH), FLWR_HOME if given, and a short
    ClientApp poll interval."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p])
    # Flower's commands start each other by name (flower-superexec, flwr-clientapp, ...).
    env['PATH'] = os.pathsep.join([os.path.dirname(sys.executable), env.get('PATH', '')])
    if flwr_home:
        env['FLWR_HOME'] = flwr_home
    env.setdefault('FLWR_SUPEREXEC_TASK_POLL_INTERVAL', '0.2')
    return env


def free_port() -> int:
    """A TCP port of this machine that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc=None) -> None:
    """Waits until `host:port` accepts connections (DeployError after `timeout` s, or if `proc`
    exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f'the process listening on port {port} exited ({proc.returncode}).')
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f'nothing listens on {host}:{port} after {timeout:g} s.')


def superlink_args(port: int, *, host: str = '127.0.0.1', certs: str | None = None) -> list[str]:
    """`flower-superlink` with TLS from `certs` (ca.crt, server.pem, server.key; see
    launch/make_certs.py) or, without, --insecure."""
    args = [
        command('flower-superlink'),
        '--host',
        host,
        '--port',
        str(port),
        '--disable-runtime-dependency-installation',
    ]
    if certs:
        args += [
            '--ssl-ca-certfile',
            os.path.join(certs, 'ca.crt'),
            '--ssl-certfile',
            os.path.join(certs, 'server.pem'),
            '--ssl-keyfile',
            os.path.join(certs, 'server.key'),
        ]
    else:
        args.append('--insecure')
    return args


def supernode_args(
    superlink: str,
    hospital: int,
    *,
    runtime_port: int | None = None,
    data_dir: str = '',
    max_epsilon: float = 0.0,
    state_dir: str = '',
    certs: str | None = None,
    auth_key: str | None = None,
) -> list[str]:
    """`flower-supernode` of hospital `hospital`, connecting to `superlink` (host:port), over TLS
    (the CA `certs`/ca.crt) or --insecure, authenticated with `auth_key` if given."""
    node = [f'hospital={int(hospital)}']
    if data_dir:
        node.append(f'data-dir="{os.path.abspath(data_dir)}"')
    if max_epsilon:
        node.append(f'max-epsilon={float(max_epsilon)}')
    if state_dir:
        node.append(f'state-dir="{os.path.abspath(state_dir)}"')
    args = [
        command('flower-supernode'),
        '--superlink',
        superlink,
        '--port',
        str(runtime_port or SUPERNODE_BASE_PORT + int(hospital)),
        '--node-config',
        ' '.join(node),
    ]
    args += ['--root-certificates', os.path.join(certs, 'ca.crt')] if certs else ['--insecure']
    if auth_key:
        args += ['--auth-supernode-private-key', auth_key]
    return args


def write_connection(
    flwr_home: str, address: str, *, certs: str | None = None, name: str = 'fedjax_med'
) -> str:
    """Writes FLWR_HOME/config.toml with SuperLink connection `name` at `address` (the default);
    returns the name."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ['[superlink]', f'default = "{name}"', f'[superlink.{name}]', f'address = "{address}"']
    if certs:
        lines.append(f'root-certificates = "{os.path.abspath(os.path.join(certs, "ca.crt"))}"')
    else:
        lines.append('insecure = true')
    with open(os.path.join(flwr_home, 'config.toml'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return name


def write_run_config(path: str, *, config: str, overrides: str, workdir: str, **extra) -> str:
    """The ServerApp's run config as a TOML file (what `flwr run --run-config FILE` takes)."""

    def value(v):
        if isinstance(v, bool):
            return 'true' if v else 'false'
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace('\\', '\\\\').replace('"', '\\"') + '"'

    items = {'config': config, 'overrides': overrides, 'workdir': os.path.abspath(workdir)}
    items.update({k.replace('_', '-'): v for k, v in extra.items()})
    with open(path, 'w') as f:
        f.write(''.join(f'{k} = {value(v)}\n' for k, v in items.items()))
    return path


def flwr_run_args(run_config: str, connection: str = 'fedjax_med') -> list[str]:
    """`flwr run` of fedjax_med's Flower app with the run config file `run_config`, streaming its
    log until the run ends."""
    return [command('flwr'), 'run', APP_DIR, connection, '--run-config', run_config, '--stream']


def descendants(pid: int) -> list[int]:
    """The processes started (directly or not) by process `pid` (Linux /proc)."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        children = [c for c, parent in parents.items() if parent == p]
        out += children
        frontier += children
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


class LocalDeployment:
    """A SuperLink and `num_hospitals` SuperNodes on this machine, over loopback (see the module
    docstring). Logs go to `root`/logs/; FLWR_HOME is `root`/flwr_home.

    Args:
      root: a folder for logs, FLWR_HOME and run configs.
      num_hospitals: SuperNodes to start, hospitals 0..N-1 (`hospitals` overrides the list).
      port: the SuperLink's port.
      certs: TLS certificates folder (launch/make_certs.py); None: --insecure.
      auth_keys: {hospital: private key file} to authenticate SuperNodes with (SuperLink started
        with --enable-supernode-auth); the public key of each (the file + '.pub', as
        launch/make_certs.py writes it) is registered with the SuperLink (`register_node`)
        before the SuperNodes start, unless the hospital is in `unregistered`.
      unregistered: hospitals whose keys are not registered (their SuperNodes are refused).
      register: more SuperNode public keys (OpenSSH files) to register; any key, here or in
        `auth_keys`, turns SuperNode authentication on.
      node_options: {hospital: supernode_args keyword arguments} (data_dir, max_epsilon, ...).
      hospitals: the hospitals to start SuperNodes for (default: 0..num_hospitals-1).
      host: the address the SuperLink listens on (0.0.0.0: every interface).
    """

    def __init__(
        self,
        root: str,
        *,
        num_hospitals: int,
        port: int = DEFAULT_PORT,
        certs: str | None = None,
        auth_keys: dict | None = None,
        node_options: dict | None = None,
        hospitals: list[int] | None = None,
        host: str = '127.0.0.1',
        unregistered: tuple = (),
        register: list[str] | None = None,
    ):
        self.root, self.port, self.certs, self.host = os.path.abspath(root), port, certs, host
        self.unregistered = set(unregistered)
        self.register = [(key, os.path.basename(key)) for key in register or []]
        self.hospitals = list(range(num_hospitals)) if hospitals is None else list(hospitals)
        self.auth_keys = auth_keys or {}
        self.register += [
            (key + '.pub', f'hospital_{k}')
            for k, key in sorted(self.auth_keys.items())
            if k not in self.unregistered
        ]
        for path in [certs and os.path.join(certs, n) for n in CERT_FILES] + [
            key for key, _ in self.register
        ]:
            if path and not os.path.isfile(path):
                raise DeployError(
                    f'{path} does not exist; make the certificates and keys with python '
                    'launch/make_certs.py --out=DIR --nodes=N.'
                )
        self.node_options = node_options or {}
        self.flwr_home = os.path.join(self.root, 'flwr_home')
        self.logs = os.path.join(self.root, 'logs')
        os.makedirs(self.logs, exist_ok=True)
        self.env = child_env(self.flwr_home)
        self.address = f'{"localhost" if certs else "127.0.0.1"}:{port}'
        self.superlink = None
        self.supernodes: dict[int, subprocess.Popen] = {}

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(os.path.join(self.logs, log_name), 'ab')  # noqa: SIM115 (kept by the process)
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
        )

    def start_superlink(self) -> None:
        args = superlink_args(self.port, host=self.host, certs=self.certs)
        if self.register or self.auth_keys:
            args.append('--enable-supernode-auth')
        self.superlink = self._start(args, 'superlink.log')
        wait_for_port('127.0.0.1', self.port, 60, self.superlink)
        write_connection(self.flwr_home, self.address, certs=self.certs)
        for key, name in self.register:
            self.register_node(key, name)

    def register_node(self, public_key: str, name: str) -> None:
        """Registers a SuperNode's public key (OpenSSH format) with the SuperLink
        (`flwr supernode register`); only registered SuperNodes may connect."""
        out = subprocess.run(
            [command('flwr'), 'supernode', 'register', public_key, '--name', name],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            lines = (out.stdout + out.stderr).strip().splitlines() or ['(no output)']
            raise DeployError(
                f'flwr supernode register {public_key} failed: {lines[-1]}; check the key '
                '(launch/make_certs.py --nodes=N writes hospital_K.pub) and the SuperLink.'
            )

    def start_supernode(self, hospital: int) -> subprocess.Popen:
        args = supernode_args(
            self.address,
            hospital,
            certs=self.certs,
            auth_key=self.auth_keys.get(hospital),
            runtime_port=free_port(),
            **self.node_options.get(hospital, {}),
        )
        proc = self._start(args, f'hospital_{hospital}.log')
        self.supernodes[hospital] = proc
        return proc

    def __enter__(self) -> 'LocalDeployment':
        self.start_superlink()
        for k in self.hospitals:
            self.start_supernode(k)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(
        self,
        *,
        config: str,
        overrides: str,
        workdir: str,
        timeout: float = 600,
        background: bool = False,
        name: str = 'run',
        **extra,
    ):
        """`flwr run` of a deployed run; returns (exit status, its log) or, `background`, the
        process (its log in logs/NAME.log)."""
        path = write_run_config(
            os.path.join(self.root, f'{name}.toml'),
            config=config,
            overrides=overrides,
            workdir=workdir,
            **extra,
        )
        log_path = os.path.join(self.logs, f'{name}.log')
        proc = self._start(flwr_run_args(path), f'{name}.log')
        if background:
            return proc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with open(log_path, errors='replace') as f:
            return proc.returncode, f.read()

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink started (flwr-serverapp)."""
        if self.superlink is None:
            return []
        return [p for p in descendants(self.superlink.pid) if 'flwr-serverapp' in cmdline(p)]

    def stop(self) -> None:
        """Stops the SuperNodes and the SuperLink, and every process they started."""
        procs = list(self.supernodes.values()) + ([self.superlink] if self.superlink else [])
        for proc in procs:
            if proc.poll() is None:
                children = descendants(proc.pid)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                for child in children:
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.supernodes, self.superlink = {}, None
