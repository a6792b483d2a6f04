"""Command line of the deployment: `python -m fedjax_med.deploy COMMAND`.

  server    start the SuperLink and submit the run (`flwr run`); waits until the run ends.
              python -m fedjax_med.deploy server --config=configs/chestxray14.py:smoke \\
                  --set data.num_clients=3 --workdir=runs/deployed [--host=0.0.0.0 --port=9093]
  hospital  start hospital K's SuperNode, connected to the server's SuperLink.
              python -m fedjax_med.deploy hospital --hospital=0 --superlink=SERVER:9093 \\
                  [--data_dir=DIR] [--max_epsilon=E] [--state_dir=DIR]
  demo      the server and N hospitals on this machine over loopback, in one command.
              python -m fedjax_med.deploy demo --config=configs/chestxray14.py:smoke \\
                  --set data.num_clients=3 --hospitals=3 --workdir=runs/demo

Without --certs these connect without TLS (--insecure), for one machine or a trusted network
only. With TLS and SuperNode authentication (keys from python launch/make_certs.py --out=certs
--nodes=3):
  server    --certs=certs --register=certs/hospital_0.pub --register=... (TLS with
            certs/server.pem, server.key, ca.crt; only the registered SuperNodes may connect)
  hospital  --certs=certs --auth_key=certs/hospital_0 --superlink=localhost:9093 (a folder with
            ca.crt; the SuperLink's name must be one of the certificate's --hosts)
  demo      --certs=certs [--auth] (--auth: every hospital authenticates with certs/hospital_K)

User errors (a bad flag, a config the deployment cannot run) are one line and exit status 2.
"""

import argparse
import os
import subprocess
import sys

from fedjax_med.deploy import common, local


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m fedjax_med.deploy')
    commands = parser.add_subparsers(dest='command', required=True)

    def run_flags(p):
        p.add_argument('--config', required=True, help='FILE[:VARIANT], as --config takes it')
        p.add_argument(
            '--set', action='append', default=[], metavar='FIELD=VALUE', help='config override'
        )
        p.add_argument('--workdir', required=True, help='metrics.jsonl, checkpoints/ go here')
        p.add_argument('--port', type=int, default=local.DEFAULT_PORT, help="SuperLink's port")
        p.add_argument('--certs', default='', help='TLS: ca.crt, server.pem, server.key here')

    server = commands.add_parser('server', help='start the SuperLink and submit the run')
    run_flags(server)
    server.add_argument('--host', default='127.0.0.1', help='address the SuperLink listens on')
    server.add_argument(
        '--register',
        action='append',
        default=[],
        metavar='KEY.pub',
        help='a SuperNode public key allowed to connect (turns node authentication on)',
    )

    hospital = commands.add_parser('hospital', help="start one hospital's SuperNode")
    hospital.add_argument('--hospital', type=int, required=True, help='its id in the federation')
    hospital.add_argument('--superlink', required=True, help="the server's HOST:PORT")
    hospital.add_argument('--data_dir', default='', help='its own built dataset')
    hospital.add_argument('--max_epsilon', type=float, default=0.0, help='its own budget')
    hospital.add_argument('--state_dir', default='', help='where it keeps its accountant')
    hospital.add_argument('--certs', default='', help="TLS: a folder with the CA's ca.crt")
    hospital.add_argument('--auth_key', default='', help='its private key, if nodes authenticate')

    demo = commands.add_parser('demo', help='server and N hospitals on this machine')
    run_flags(demo)
    demo.add_argument('--hospitals', type=int, default=3, help='number of hospitals')
    demo.add_argument(
        '--auth', action='store_true', help='SuperNode authentication with --certs/hospital_K'
    )
    return parser


def _check(args) -> str:
    """The run's config overrides as one string, after checking the config loads and deploys."""
    overrides = ' '.join(args.set)
    config = common.load_config(args.config, overrides)
    problems = common.deploy_problems(config)
    if problems:
        raise common.DeployError(problems[0])
    if args.command == 'demo' and args.hospitals != config.data.num_clients:
        raise common.DeployError(
            f'--hospitals={args.hospitals}: the config has config.data.num_clients='
            f'{config.data.num_clients}; give --set data.num_clients={args.hospitals}.'
        )
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == 'hospital':
            for flag, path in (
                ('--certs', args.certs and os.path.join(args.certs, 'ca.crt')),
                ('--auth_key', args.auth_key),
            ):
                if path and not os.path.isfile(path):
                    raise common.DeployError(
                        f'{flag}: {path} does not exist; copy it from the server '
                        '(python launch/make_certs.py --out=DIR --nodes=N writes it).'
                    )
            cmd = local.supernode_args(
                args.superlink,
                args.hospital,
                data_dir=args.data_dir,
                max_epsilon=args.max_epsilon,
                state_dir=args.state_dir,
                certs=args.certs or None,
                auth_key=args.auth_key or None,
            )
            return subprocess.call(cmd, env=local.child_env())
        overrides = _check(args)
        root = os.path.join(os.path.abspath(args.workdir), 'deployment')
        certs = args.certs or None
        if args.command == 'demo':
            if args.auth and not certs:
                raise common.DeployError('--auth needs --certs=DIR with hospital_K key files.')
            keys = (
                {k: os.path.join(certs, f'hospital_{k}') for k in range(args.hospitals)}
                if args.auth
                else None
            )
            with local.LocalDeployment(
                root, num_hospitals=args.hospitals, port=args.port, certs=certs, auth_keys=keys
            ) as d:
                print(f'fedjax_med.deploy: logs in {d.logs}', flush=True)
                status, log = d.run(config=args.config, overrides=overrides, workdir=args.workdir)
            print(log, end='')
            return status
        d = local.LocalDeployment(
            root,
            num_hospitals=0,
            port=args.port,
            host=args.host,
            certs=certs,
            register=args.register,
        )
        d.start_superlink()
        try:
            print(f'fedjax_med.deploy: SuperLink on port {args.port}; logs in {d.logs}')
            status, log = d.run(config=args.config, overrides=overrides, workdir=args.workdir)
            print(log, end='')
            return status
        finally:
            d.stop()
    except common.DeployError as e:
        print(f'fedjax_med.deploy: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
