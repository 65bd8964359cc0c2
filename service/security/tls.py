"""TLS for the gRPC and HTTP ports: one certificate and key, and a client CA for mutual TLS.

The metrics port stays plaintext; the server's plaintext health port (for kubelet's gRPC probes) is
the server's own business (`service.server.health_port`).
"""

from __future__ import annotations

import ssl

import grpc

from service.settings import Settings


def tls_enabled(settings: Settings) -> bool:
    """Whether the gRPC and HTTP ports speak TLS; a half-configured TLS is an error, never plaintext."""
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if (cert is None) != (key is None):
        raise ValueError("TLS needs both CONVSERVE_TLS_CERT_FILE and CONVSERVE_TLS_KEY_FILE")
    if ca is not None and cert is None:
        raise ValueError("CONVSERVE_TLS_CLIENT_CA_FILE (mutual TLS) needs a server certificate and key too")
    return cert is not None


def _read(path: object, what: str) -> bytes:
    try:
        with open(path, "rb") as f:  # type: ignore[call-overload]
            return f.read()
    except OSError as exc:
        raise OSError(f"cannot read {what} {path}: {exc.strerror}") from None


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS credentials of the gRPC port; with a client CA, client certificates are required and verified."""
    cert = _read(settings.tls_cert_file, "TLS certificate")
    key = _read(settings.tls_key_file, "TLS key")
    ca = _read(settings.tls_client_ca_file, "client CA") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The HTTP port's TLS: the same certificate, and the same client CA for mutual TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
        if settings.tls_client_ca_file is not None:
            context.load_verify_locations(cafile=str(settings.tls_client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot load the TLS certificate, key or client CA: {exc}") from None
    return context
