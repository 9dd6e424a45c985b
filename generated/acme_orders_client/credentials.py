"""Credentials: bearer tokens and JWTs per call, TLS and mutual TLS per channel.

The server reads `authorization: Bearer <token>` (docs/security.md). gRPC
sends call credentials only over a channel that protects them: TLS, or a
plain-text connection to a loopback address (`grpc.local_channel_credentials`,
which `connect` picks when given call credentials and no TLS; it refuses any
other address, so a token never crosses a network in clear).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import grpc

_BEARER = "Bearer "


def _checked(token: str) -> str:
    if not token or any(c.isspace() for c in token):
        raise ValueError("a bearer token is one non-empty word, without spaces")
    return token


def bearer_token(token: str) -> grpc.CallCredentials:
    """Sends `authorization: Bearer <token>` with every call: a static token (`ord_...`)."""
    return grpc.access_token_call_credentials(_checked(token))


class _TokenPlugin(grpc.AuthMetadataPlugin):
    """Asks `get_token` for the token on every call, so a refreshed JWT is used at once."""

    def __init__(self, get_token: Callable[[], str]) -> None:
        self._get_token = get_token

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            token = _checked(self._get_token())
        except Exception as exc:  # the call fails with UNAVAILABLE, naming the error
            callback((), exc)
            return
        callback((("authorization", _BEARER + token),), None)


def jwt_credentials(get_token: Callable[[], str]) -> grpc.CallCredentials:
    """A JWT (or any token that expires) as the bearer token, fetched anew for every call.

    `get_token` runs on a gRPC thread, not the event loop: it may block on a
    cache or a refresh, briefly, and must be thread-safe. If it raises, the
    call fails with UNAVAILABLE ("Getting metadata from plugin failed").
    """
    return grpc.metadata_call_credentials(_TokenPlugin(get_token), name="acme-orders-bearer")


@dataclass(frozen=True)
class Tls:
    """TLS for the channel. The defaults: the system's root CAs, no client certificate.

    root_certificates: PEM of the CA(s) to trust instead of the system's.
    certificate_chain, private_key: PEM of a client certificate, for mutual TLS.
    server_name: the name to check the server's certificate for, when it is
    not the target's host (an IP address, a load balancer's name).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and private_key")

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        server_name: str | None = None,
    ) -> Tls:
        """TLS from PEM files: `ca` to trust, `cert` and `key` for mutual TLS."""

        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as file:
                return file.read()

        return cls(read(ca), read(cert), read(key), server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
