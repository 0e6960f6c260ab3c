"""Make a private CA and a server certificate for the broker's TLS listener.

For a test bench, a workshop or a first cluster: production sites usually bring their own
PKI (cert-manager on Kubernetes, the plant's CA) and skip this script.

    python infra/mosquitto/make_certs.py --out certs --host mosquitto --host localhost

writes into ``certs/``:

* ``ca.pem`` / ``ca.key`` - the CA.  ``ca.pem`` goes to every client (``mqtts://...?ca=ca.pem``);
  ``ca.key`` stays offline (it can mint certificates the whole stack trusts).
* ``server.pem`` / ``server.key`` - the broker's certificate (signed by the CA) and key, for
  ``certfile``/``keyfile`` in infra/mosquitto/mosquitto.conf.  Every ``--host`` becomes a
  subject alternative name (DNS name or IP address): clients verify the host they dial.

Keys are EC P-256; the files ending in ``.key`` are written with mode 0600.  Needs the
``cryptography`` package (installed with MLflow).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path


def _write(path: Path, data: bytes, private: bool) -> None:
    # Create private files as 0600 from the start (no window where the key is world-readable).
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certs(out_dir: str | os.PathLike, hosts: list[str], *, days: int = 365,
               ca_name: str = "flywheel test CA") -> dict[str, Path]:
    """Write ca.pem, ca.key, server.pem, server.key into ``out_dir``; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("make_certs needs at least one host name or IP for the server certificate "
                         "(the name clients dial, e.g. --host mosquitto --host localhost)")
    if days <= 0:
        raise ValueError(f"days should be positive, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    no_pw = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    paths = {name: out / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
    _write(paths["ca.pem"], ca_cert.public_bytes(pem), private=False)
    _write(paths["ca.key"], ca_key.private_bytes(pem, pkcs8, no_pw), private=True)
    _write(paths["server.pem"], cert.public_bytes(pem), private=False)
    _write(paths["server.key"], key.private_bytes(pem, pkcs8, no_pw), private=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Make a private CA and a TLS server certificate for Mosquitto.",
        epilog="example: python infra/mosquitto/make_certs.py --out certs --host mosquitto --host localhost")
    p.add_argument("--out", required=True, help="directory to write ca.pem, ca.key, server.pem, server.key")
    p.add_argument("--host", action="append", default=[],
                   help="DNS name or IP clients use to reach the broker (repeat; the first is the CN)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    args = p.parse_args(argv)
    try:
        paths = make_certs(args.out, args.host, days=args.days)
    except ValueError as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(v) for v in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
