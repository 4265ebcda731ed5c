"""`fedhl certs`: a private CA and a server certificate for the coordinator, created once.

Files in `out` (PEM): `ca.crt`, `ca.key` (kept to issue the next server certificate),
`server.crt`, `server.key`; keys are 0600. Run again, it keeps what is valid: the CA if both
its files are there, the server certificate if the CA signed it, it covers every requested
name and has at least `renew_days` left. So a one-shot at every `docker compose up` creates
them on the first start only, and agents keep trusting the same CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients such as macOS accept for a server certificate
RENEW_DAYS = 30
IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # a CA brought by the operator may be RSA


class CertError(ValueError):
    """Existing files that cannot be used; the message names the file."""


@dataclass(frozen=True)
class CertReport:
    ca_created: bool
    server_issued: bool
    names: tuple[str, ...]
    not_after: dt.datetime

    def lines(self, out: Path) -> list[str]:
        return [
            f"CA {'created' if self.ca_created else 'kept'}: {out / CA_CERT}",
            f"server certificate {'issued' if self.server_issued else 'kept'}: {out / SERVER_CERT} "
            f"(names {', '.join(self.names)}; valid until {self.not_after:%Y-%m-%d})",
        ]


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic and durable: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask
    os.replace(tmp, path)


def _key_pem(key: IssuerKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise CertError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError:
        raise CertError(f"{path}: not a PEM certificate") from None


def load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, IssuerKey]:
    """A certificate and its private key (PEM, unencrypted), checked to belong together."""
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise CertError(f"{key_path}: cannot read it ({e.strerror})") from None
    except (ValueError, TypeError):
        raise CertError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def _new_ca(now: dt.datetime) -> tuple[x509.Certificate, IssuerKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedHL private CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: x509.Certificate, ca_key: IssuerKey, names: Sequence[str], now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def cert_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses of a certificate's SubjectAlternativeName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _still_good(
    cert: x509.Certificate, ca: x509.Certificate, names: Sequence[str], now: dt.datetime, renew_days: int
) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    return wanted <= cert_names(cert) and cert.not_valid_after_utc - now > dt.timedelta(days=renew_days)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def ensure_certs(
    out: Path,
    names: Sequence[str],
    *,
    ca_out: Path | None = None,
    renew_days: int = RENEW_DAYS,
    now: dt.datetime | None = None,
) -> CertReport:
    """Create what is missing in `out` (see the module docstring); copy `ca.crt` to `ca_out`
    (a directory agents may read, without any key) when given."""
    if not names:
        raise CertError("give at least one name for the server certificate (--name)")
    now = now or dt.datetime.now(dt.UTC)
    out.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = out / CA_CERT, out / CA_KEY
    ca_created = not (ca_path.exists() and ca_key_path.exists())
    if ca_created:
        ca, ca_key = _new_ca(now)
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(ca_path, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        ca, ca_key = load_pair(ca_path, ca_key_path)
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    server: x509.Certificate | None = None
    if not ca_created and cert_path.exists() and key_path.exists():
        server, _ = load_pair(cert_path, key_path)
        if not _still_good(server, ca, names, now, renew_days):
            server = None
    issued = server is None
    if server is None:
        server, key = _issue(ca, ca_key, list(names), now)
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, server.public_bytes(serialization.Encoding.PEM), 0o644)
    if ca_out is not None:
        ca_out.mkdir(parents=True, exist_ok=True)
        target = ca_out / CA_CERT
        if not target.exists() or target.read_bytes() != ca_path.read_bytes():
            tmp = target.with_name(CA_CERT + ".tmp")
            shutil.copyfile(ca_path, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    return CertReport(ca_created, issued, tuple(sorted(cert_names(server))), server.not_valid_after_utc)
