"""TLS on the coordinator's two planes (the agent gRPC plane, the admin REST API).

Production serves both over TLS, or refuses to start with a message that says how to fix it,
unless the operator sets `FEDHL_ALLOW_INSECURE=true`, which is logged as a warning at every
start. Certificates and keys are checked here (readable PEM, the key of its certificate, in its
validity period) so that a bad file is named at start, not reported as a TLS library error.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from ..certs import CertError, load_certificate, load_pair
from ..settings import Settings, SettingsError

log = logging.getLogger(__name__)

MAKE_CERTS = (
    "`fedhl certs --out DIR --name HOST` creates a private CA (DIR/ca.crt, for the agents) and a server "
    "certificate (DIR/server.crt, DIR/server.key) for both"
)
ALLOW_INSECURE = "or set FEDHL_ALLOW_INSECURE=true to serve plaintext anyway (development only; logged at every start)"


@dataclass(frozen=True)
class Plane:
    name: str  # as an operator reads it
    var: str  # FEDHL_<var>_CERT / _KEY
    cert: str | None
    key: str | None
    address: str


def planes(settings: Settings) -> tuple[Plane, Plane]:
    return (
        Plane(
            "the agent gRPC plane",
            "FEDHL_GRPC_TLS",
            settings.grpc_tls_cert,
            settings.grpc_tls_key,
            f"{settings.grpc_host}:{settings.grpc_port}",
        ),
        Plane(
            "the admin REST API",
            "FEDHL_HTTP_TLS",
            settings.http_tls_cert,
            settings.http_tls_key,
            f"{settings.http_host}:{settings.http_port}",
        ),
    )


def _plaintext_allowed(settings: Settings, missing: list[Plane]) -> bool:
    return not missing or settings.env == "development" or settings.allow_insecure


def _warn_plaintext(settings: Settings, plane: Plane) -> None:
    if settings.env != "development":
        log.warning(
            "FEDHL_ALLOW_INSECURE=true: %s serves PLAINTEXT on %s; credentials, tokens and model updates "
            "cross the network unencrypted (set %s_CERT and %s_KEY for TLS)",
            plane.name,
            plane.address,
            plane.var,
            plane.var,
        )


def _refusal(missing: list[Plane]) -> SettingsError:
    each = "; ".join(
        f"{p.name} has none: set {p.var}_CERT and {p.var}_KEY to its PEM certificate and key" for p in missing
    )
    return SettingsError(f"production serves TLS only, and {each}. {MAKE_CERTS}; {ALLOW_INSECURE}")


def _check_pair(plane: Plane, now: dt.datetime) -> tuple[bytes, bytes]:
    """The PEM bytes of a plane's certificate and key, or a SettingsError naming the file."""
    assert plane.cert and plane.key
    try:
        cert, key = load_pair(Path(plane.cert), Path(plane.key))
    except CertError as e:
        raise SettingsError(f"{plane.var}_CERT/_KEY: {e}") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SettingsError(
            f"{plane.var}_CERT {plane.cert} is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now: renew it (`fedhl certs` renews its own)"
        )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Path(plane.cert).read_bytes(), pem_key


def require_tls(settings: Settings) -> None:
    """Start-up check of both planes: in production each has a usable certificate and key, or
    FEDHL_ALLOW_INSECURE=true says plaintext is wanted (a warning per plane). SettingsError
    otherwise, with what to set."""
    now = dt.datetime.now(dt.UTC)
    missing = [p for p in planes(settings) if not p.cert]
    if not _plaintext_allowed(settings, missing):
        raise _refusal(missing)
    grpc_plane, http_plane = planes(settings)
    if not http_plane.cert:
        _warn_plaintext(settings, http_plane)  # the gRPC plane warns as its server is built
    for plane in (grpc_plane, http_plane):
        if plane.cert:
            _check_pair(plane, now)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC plane's TLS credentials (mTLS when FEDHL_GRPC_TLS_CLIENT_CA is set), or None
    for plaintext, which production allows only with FEDHL_ALLOW_INSECURE=true."""
    grpc_plane = planes(settings)[0]
    if not grpc_plane.cert:
        if not _plaintext_allowed(settings, [grpc_plane]):
            raise _refusal([grpc_plane])
        _warn_plaintext(settings, grpc_plane)
        return None
    cert, key = _check_pair(grpc_plane, dt.datetime.now(dt.UTC))
    client_ca = None
    if settings.grpc_tls_client_ca:
        try:
            load_certificate(Path(settings.grpc_tls_client_ca))
        except CertError as e:
            raise SettingsError(f"FEDHL_GRPC_TLS_CLIENT_CA: {e}") from None
        client_ca = Path(settings.grpc_tls_client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
