"""Makes the key material of a test deployment: a self-signed CA, the SuperLink's TLS
certificate signed by it, and SuperNode authentication key pairs.

    python launch/make_certs.py --out=certs/ [--hosts=localhost,127.0.0.1] [--nodes=3]

writes, in --out:
  ca.crt, ca.key          the CA (ECDSA P-384, 10 years); every SuperNode and `flwr` is given
                          ca.crt (`--root-certificates`) to check the SuperLink with;
  server.pem, server.key  the SuperLink's certificate for --hosts (DNS names and IP addresses,
                          subjectAltName), signed by the CA (`--ssl-certfile` / `--ssl-keyfile`,
                          with `--ssl-ca-certfile ca.crt`);
  hospital_K, hospital_K.pub  for K < --nodes: SuperNode K's authentication key pair (ECDSA
                          P-384, OpenSSH format, as Flower 1.42 reads it): the private key stays
                          at hospital K (`--auth-supernode-private-key`), the public key is
                          registered with the SuperLink (`flwr supernode register`).

Self-signed certificates are for a test deployment or one inside an institution that runs its
own CA; the private keys are written readable by their owner only. Needs only `cryptography`.
"""

import argparse
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _write(path: str, data: bytes, *, private: bool = False) -> None:
    with open(path, 'wb') as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(out: str, hosts: list[str], nodes: int = 0, days: int = 3650) -> list[str]:
    """Writes the CA, the server certificate for `hosts` and `nodes` SuperNode key pairs in
    `out`; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fedjax_med deployment CA')])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    paths = {
        'ca.crt': (ca.public_bytes(serialization.Encoding.PEM), False),
        'ca.key': (_pem_key(ca_key), True),
        'server.pem': (server.public_bytes(serialization.Encoding.PEM), False),
        'server.key': (_pem_key(server_key), True),
    }
    for k in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        paths[f'hospital_{k}'] = (
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            True,
        )
        paths[f'hospital_{k}.pub'] = (
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
            False,
        )
    written = []
    for name, (data, private) in paths.items():
        path = os.path.join(out, name)
        _write(path, data, private=private)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='folder to write the files to')
    parser.add_argument(
        '--hosts',
        default='localhost,127.0.0.1',
        help='comma-separated names and addresses the SuperLink is reached at',
    )
    parser.add_argument('--nodes', type=int, default=0, help='SuperNode key pairs to make')
    parser.add_argument('--days', type=int, default=3650, help='validity of the certificates')
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(',') if h.strip()]
    if not hosts:
        print(
            f'make_certs.py: error: --hosts={args.hosts!r} names no host; give e.g. '
            '--hosts=localhost,127.0.0.1.',
            file=sys.stderr,
        )
        return 2
    if args.nodes < 0 or args.days < 1:
        print(
            f'make_certs.py: error: --nodes={args.nodes} --days={args.days}: give --nodes >= 0 '
            'and --days >= 1.',
            file=sys.stderr,
        )
        return 2
    for path in make_certs(args.out, hosts, args.nodes, args.days):
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
