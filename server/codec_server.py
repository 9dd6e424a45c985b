"""`python -m server.codec_server`: Temporal's remote codec protocol, for the Web UI and the CLI.

POST /decode and /encode take and give `{"payloads": [<Payload as protobuf JSON>]}`,
decrypted or encrypted with the keys file (infra/codec.py, docs/decisions/0017).
Browsers get CORS for the allowed origins only. With a tokens file, every POST needs
`Authorization: Bearer <token>` of a caller that may call GetOrder (the codec shows
what GetOrder would); without one it listens on loopback only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any, ClassVar, Self
from urllib.parse import urlsplit

from google.protobuf import json_format
from pydantic import AfterValidator, model_validator
from pydantic_settings import NoDecode
from temporalio.api.common.v1 import Payload, Payloads

from infra import process
from infra.codec import EncryptionCodec, UndecryptablePayload
from infra.keys import KeySettings
from infra.logs import LogSettings
from infra.settings import (
    CommaList,
    Options,
    Port,
    ProcessSettings,
    Text,
    setting,
)
from server.platform import tls, tokens
from server.platform.auth import BearerTokenAuth, Unauthenticated

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8081
# Far above what the UI sends for one history page; a bigger body is refused unread.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Who may decode: whoever may read an order through the API.
READ_ORDERS = tokens.ORDER_METHODS["GetOrder"]
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
# Idle keep-alive connections and slow clients give their thread back after this.
SOCKET_TIMEOUT_SECONDS = 30


def _origin(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"{value!r} is not an origin: give scheme://host[:port], no path")
    return f"{parts.scheme}://{parts.netloc}".lower()


def _origins(values: frozenset[str]) -> frozenset[str]:
    if not values:
        raise ValueError("give at least one origin, e.g. http://localhost:8233")
    return frozenset(_origin(value) for value in values)


# "http://localhost:8233,https://ui.example.com" in a flag or variable.
Origins = Annotated[frozenset[str], NoDecode, CommaList, AfterValidator(_origins)]


class CodecSettings(Options):
    """The codec server."""

    host: Text = setting("localhost", "ORDER_CODEC_HOST", "address to listen on")
    port: Port = setting(DEFAULT_PORT, "ORDER_CODEC_PORT", "port; 0 picks a free one")
    allowed_origins: Origins = setting(
        frozenset({"http://localhost:8233"}),
        "ORDER_CODEC_ALLOWED_ORIGINS",
        "origins of the Web UIs that may call it from a browser (CORS), comma-separated",
    )
    auth_tokens_file: tokens.TokensFile | None = setting(
        None,
        "ORDER_AUTH_TOKENS_FILE",
        "the gRPC server's tokens file: every request needs the bearer token of a caller "
        "that may call GetOrder",
        shown="none: loopback only, no tokens needed",
    )
    allow_insecure_remote: bool = setting(
        False,
        "ORDER_CODEC_ALLOW_INSECURE_REMOTE",
        "allow plain HTTP on a non-loopback --host (behind a proxy that terminates TLS)",
    )

    @model_validator(mode="after")
    def _check_exposure(self) -> Self:
        if tls.is_loopback(self.host):
            return self
        if self.auth_tokens_file is None:
            raise ValueError(
                f"refusing to listen on {self.host} without --auth-tokens-file: anyone "
                "who reaches it could decrypt every order"
            )
        if not self.allow_insecure_remote:
            raise ValueError(
                f"refusing plain HTTP on {self.host}: tokens and decrypted orders would cross "
                "the network in clear text. Put a proxy that terminates TLS in front and give "
                "--allow-insecure-remote (ORDER_CODEC_ALLOW_INSECURE_REMOTE=true)"
            )
        return self


class CodecServerSettings(ProcessSettings, CodecSettings, KeySettings, LogSettings):
    """Every setting of `python -m server.codec_server`."""

    prog: ClassVar[str] = "python -m server.codec_server"
    description: ClassVar[str] = (
        "Temporal's remote codec (POST /decode, /encode) for the Web UI and "
        "`temporal --codec-endpoint`: orders decrypted for those who may read them."
    )


class RequestError(Exception):
    """Ends a request with `status` and a JSON `{"error": message}`."""

    def __init__(self, status: HTTPStatus, message: str, headers: Mapping[str, str] = {}) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers)


class CodecService:
    """What the server does, apart from HTTP: who may, and the codec itself."""

    def __init__(self, settings: CodecServerSettings) -> None:
        self.codec = EncryptionCodec(settings.keys)
        self.origins = settings.allowed_origins
        tokens_file = settings.auth_tokens_file
        self._auth = (
            None
            if tokens_file is None
            else BearerTokenAuth(tokens.load(tokens_file), open_services=[])
        )

    def caller(self, authorization: list[str]) -> str:
        """The caller's name ("-" without a tokens file); RequestError 401 or 403."""
        if self._auth is None:
            return "-"
        try:
            caller = self._auth.authenticate(
                READ_ORDERS, [("authorization", value) for value in authorization]
            )
        except Unauthenticated as err:
            message = {
                "CREDENTIALS_MISSING": "send the header `Authorization: Bearer <token>`",
                "CREDENTIALS_MALFORMED": "send one header `Authorization: Bearer <token>`",
            }.get(err.reason, err.message)
            raise RequestError(
                HTTPStatus.UNAUTHORIZED, message, {"WWW-Authenticate": "Bearer"}
            ) from None
        if not caller.may_call(READ_ORDERS):
            raise RequestError(
                HTTPStatus.FORBIDDEN,
                f"caller {caller.name} may not call GetOrder, so may not decode orders",
            )
        return caller.name

    def apply(self, path: str, body: bytes) -> tuple[bytes, int]:
        """The answer to a POST of `body` to /encode or /decode, and how many payloads it
        holds; RequestError 400 when the body is not payloads or one does not decrypt."""
        transform: Callable[[Payload], Payload] = (
            self.codec.encrypt if path == "/encode" else self.codec.decrypt
        )
        try:
            request = json_format.Parse(body.decode("utf-8"), Payloads())
        except (json_format.ParseError, UnicodeDecodeError, RecursionError, ValueError) as err:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f'expected {{"payloads": [...]}} as JSON: {err}'
            ) from None
        answer = []
        for number, payload in enumerate(request.payloads):
            try:
                answer.append(json_format.MessageToDict(transform(payload)))
            except UndecryptablePayload as err:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"payload {number}: {err}") from None
        return json.dumps({"payloads": answer}).encode(), len(answer)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_SECONDS
    server_version = "order-codec"

    @property
    def service(self) -> CodecService:
        return self.server.service

    def _path(self) -> str:
        return "/" + urlsplit(self.path).path.strip("/")

    def _cors(self) -> dict[str, str]:
        """CORS headers for an allowed Origin; RequestError 403 for any other Origin."""
        origin = self.headers.get("Origin")
        if origin is None:  # not a browser: the CLI, curl
            return {}
        if origin.lower() not in self.service.origins:
            raise RequestError(HTTPStatus.FORBIDDEN, f"origin {origin!r} is not allowed")
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }

    def do_GET(self) -> None:
        self._refuse_method()

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _refuse_method(self) -> None:
        allowed = {"Allow": "POST, OPTIONS"}
        refusal = RequestError(HTTPStatus.METHOD_NOT_ALLOWED, "POST to /decode or /encode", allowed)
        self._send_error(refusal, cors={})

    def _send_error(self, err: RequestError, cors: Mapping[str, str]) -> None:
        body = json.dumps({"error": str(err)}).encode()
        # The body may be unread: this connection cannot carry another request.
        self.close_connection = True
        headers = {**cors, **err.headers, "Content-Type": "application/json"}
        self._send(err.status, body, {**headers, "Connection": "close"})

    def do_OPTIONS(self) -> None:
        self._serve(preflight=True)

    def do_POST(self) -> None:
        self._serve(preflight=False)

    def _serve(self, *, preflight: bool) -> None:
        started = time.perf_counter()
        path, caller, count = self._path(), "-", 0
        cors: dict[str, str] = {}
        try:
            cors = self._cors()
            if path not in ("/encode", "/decode"):
                raise RequestError(HTTPStatus.NOT_FOUND, "POST to /decode or /encode")
            if preflight:
                self._send(
                    HTTPStatus.NO_CONTENT,
                    b"",
                    {
                        **cors,
                        "Access-Control-Allow-Methods": "POST, OPTIONS",
                        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                        "Access-Control-Max-Age": "600",
                    },
                )
            else:
                caller = self.service.caller(self.headers.get_all("Authorization") or [])
                answer, count = self.service.apply(path, self._body())
                self._send(HTTPStatus.OK, answer, {**cors, "Content-Type": "application/json"})
            status = HTTPStatus.NO_CONTENT if preflight else HTTPStatus.OK
        except RequestError as err:
            status = err.status
            self._send_error(err, cors)
        logger.info(
            "%s %s %d payloads=%d namespace=%s caller=%s peer=%s %.1fms",
            self.command,
            path,
            status,
            count,
            self.headers.get("X-Namespace", "-"),
            caller,
            self.client_address[0],
            (time.perf_counter() - started) * 1000,
        )

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send Content-Length, not chunks")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes"
            )
        return self.rfile.read(int(length))

    def _send(self, status: HTTPStatus, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _serve logs one line per request, with more in it

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (a malformed request line): to the log, not stderr.
        logger.info("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: CodecService) -> None:
        self.service = service
        super().__init__(address, _Handler)


@dataclass
class CodecServer:
    """A running codec server; `url` is where the UI and the CLI reach it."""

    settings: CodecServerSettings
    http: _HTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stops accepting, waits for the serving loop; requests under way finish on their own."""
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


def start_codec_server(settings: CodecServerSettings) -> CodecServer:
    """Binds and serves in a thread of its own; OSError if the address cannot be bound."""
    service = CodecService(settings)
    try:
        http = _HTTPServer((settings.host, settings.port), service)
    except OSError as err:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}: {err}") from err
    thread = threading.Thread(target=http.serve_forever, name="codec-server", daemon=True)
    thread.start()
    return CodecServer(settings, http, thread)


async def serve(settings: CodecServerSettings, stop: asyncio.Event) -> None:
    """Runs the codec server until `stop` is set."""
    server = start_codec_server(settings)
    keys = settings.keys
    logger.info(
        "Codec server at %s (key %s encrypts, %d can decrypt; origins %s)",
        server.url,
        keys.encrypt_with,
        len(keys.payload_keys),
        ", ".join(sorted(settings.allowed_origins)),
    )
    if settings.auth_tokens_file is None:
        logger.warning(
            "No --auth-tokens-file: anyone on this machine can decode orders at %s", server.url
        )
    else:
        logger.info(
            "Bearer tokens from %s: callers that may call GetOrder", settings.auth_tokens_file
        )
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(server.stop)
    logger.info("Codec server stopped")


if __name__ == "__main__":
    process.run(CodecServerSettings, serve, "Codec server")
