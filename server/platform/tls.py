"""TLS for the gRPC port, and the rule that plain text stays on loopback."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import NoReturn

import grpc


def is_loopback(host: str) -> bool:
    """Whether the listen host is loopback only: localhost, 127.0.0.0/8 or ::1."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def check_plaintext_host(host: str, *, tls: bool, allow_insecure_remote: bool) -> None:
    """Raises ValueError when the server would serve plain text beyond loopback unasked."""
    if tls or allow_insecure_remote or is_loopback(host):
        return
    raise ValueError(
        f"refusing to listen on {host} without TLS: tokens and orders would cross the "
        "network in clear text. Give --tls-cert and --tls-key, or --allow-insecure-remote "
        "(ORDER_ALLOW_INSECURE_REMOTE=true) if something else encrypts the traffic"
    )


def _no_passphrase() -> NoReturn:
    # gRPC cannot use an encrypted key; without this, OpenSSL would prompt on the terminal.
    raise ValueError("the private key is encrypted; gRPC needs it unencrypted")


def check_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Raises ValueError unless cert and key are a matching PEM pair and client_ca a PEM CA.

    gRPC itself would only find out at the first handshake, leaving a server
    that runs but refuses every connection.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (OSError, ssl.SSLError, ValueError) as err:
        raise ValueError(f"cannot use certificate {cert} with key {key}: {err}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"cannot use client CA {client_ca}: {err}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with client_ca, client certificates are required."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=None if client_ca is None else client_ca.read_bytes(),
        require_client_auth=client_ca is not None,
    )
