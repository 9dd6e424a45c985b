"""The codec server (issue 12): Temporal's remote codec protocol, driven as the Web UI drives it.

The UI, given `--ui-codec-endpoint`, sends from the browser a CORS preflight
(OPTIONS with Origin), then `POST <endpoint>/decode` with `Content-Type:
application/json`, `X-Namespace` and, when configured, `Authorization: Bearer ...`,
the body `{"payloads": [<Payload as protobuf JSON>]}`; `temporal workflow show
--codec-endpoint` does the same without the preflight.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.testing import WorkflowEnvironment

from infra import codec
from infra.keys import new_keys
from server import tokens as tokens_cli
from server.codec_server import MAX_BODY_BYTES, CodecServer, CodecServerSettings
from server.platform import tokens
from tests.support.codec_server import codec_settings, open_codec_server
from tests.support.env import ROOT, clean_environ, run, venv_binary
from tests.support.keys import KEYS, keys_file
from tests.support.orders import create_request
from tests.support.payloads import json_payloads
from tests.support.stack import Stack
from workflows import search_attributes

UI = "http://localhost:8233"
SHOWN_EMAIL = "shown-by-the-cli@example.com"
PLAIN = Payload(metadata={"encoding": b"json/plain"}, data=b'{"customer_email": "a@b.example"}')


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    server: CodecServer,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, answer_headers, response.read())
    finally:
        connection.close()


def as_json(*payloads: Payload) -> str:
    return json.dumps({"payloads": [json_format.MessageToDict(p) for p in payloads]})


def from_json(answer: Answer) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in answer.json()["payloads"]]


def ui_post(server: CodecServer, path: str, body: bytes | str, token: str | None = None) -> Answer:
    """A POST as the Web UI sends it, after its preflight (which must pass)."""
    preflight = call(
        server,
        "OPTIONS",
        path,
        headers={
            "Origin": UI,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == UI
    assert preflight.headers["access-control-allow-credentials"] == "true"
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert {"authorization", "content-type", "x-namespace"} <= set(allowed)
    assert "POST" in preflight.headers["access-control-allow-methods"]
    headers = {"Origin": UI, "Content-Type": "application/json", "X-Namespace": "default"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return call(server, "POST", path, body, headers)


@pytest.fixture(scope="module")
def open_server() -> Iterator[CodecServer]:
    """No tokens file: development, on loopback."""
    with open_codec_server() as server:
        yield server


@dataclass
class Callers:
    path: Path
    reader: str  # storefront: may call GetOrder
    payments: str  # payment-gateway: may not
    expired: str


@pytest.fixture(scope="module")
def callers(tmp_path_factory: pytest.TempPathFactory) -> Callers:
    reader, payments, expired = tokens.new_token(), tokens.new_token(), tokens.new_token()
    path = tmp_path_factory.mktemp("codec-auth") / "tokens.toml"
    path.write_text(
        "\n".join(
            [
                tokens_cli.entry_toml("storefront", reader, role="storefront"),
                tokens_cli.entry_toml("gateway", payments, role="payment-gateway"),
                tokens_cli.entry_toml(
                    "old",
                    expired,
                    role="operator",
                    expires=tokens.parse_expiry("2020-01-01T00:00:00Z"),
                ),
            ]
        )
    )
    return Callers(path, reader, payments, expired)


@pytest.fixture(scope="module")
def guarded_server(callers: Callers) -> Iterator[CodecServer]:
    with open_codec_server(auth_tokens_file=callers.path) as server:
        yield server


# --- The protocol --------------------------------------------------------------------------


def test_the_ui_encodes_and_decodes(open_server: CodecServer) -> None:
    encoded = ui_post(open_server, "/encode", as_json(PLAIN, PLAIN))
    assert encoded.status == 200, encoded.body
    assert encoded.headers["access-control-allow-origin"] == UI
    assert encoded.headers["content-type"] == "application/json"
    sealed = from_json(encoded)
    assert [codec.key_id_of(p) for p in sealed] == [KEYS.encrypt_with] * 2
    assert b"a@b.example" not in encoded.body
    decoded = ui_post(open_server, "/decode", encoded.body)
    assert decoded.status == 200, decoded.body
    assert from_json(decoded) == [PLAIN, PLAIN]
    # Payloads from before encryption come back as they are; none is none.
    assert from_json(ui_post(open_server, "/decode", as_json(PLAIN))) == [PLAIN]
    assert ui_post(open_server, "/decode", '{"payloads": []}').json() == {"payloads": []}


async def test_the_ui_reads_an_order_from_its_history(
    temporal: WorkflowEnvironment, stack: Stack, open_server: CodecServer
) -> None:
    """What the Web UI at 8233 does with an order's history: every payload through /decode."""
    created = await stack.stub.CreateOrder(create_request())
    history = await temporal.client.get_workflow_handle(created.workflow_id).fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    memo_names = list(started.memo.fields)
    body = as_json(*started.input.payloads, *started.memo.fields.values())
    assert b"cust-001@example.com" not in body.encode()
    assert b"CUST-001" not in body.encode()
    answer = await asyncio.to_thread(ui_post, open_server, "/decode", body)
    assert answer.status == 200, answer.body
    texts = [json.loads(p.data) for p in from_json(answer)]
    assert texts[0]["order_id"] == created.order_id
    assert texts[0]["customer_email"] == "cust-001@example.com"
    memo = dict(zip(memo_names, texts[1:], strict=True))
    assert memo[search_attributes.MEMO_ORDER_STATE]["order_id"] == created.order_id
    assert memo[search_attributes.MEMO_ORDER_STATE]["status"] == "pending"
    assert memo[search_attributes.MEMO_TOTAL_AMOUNT]["currency_code"] == "USD"
    assert memo[search_attributes.MEMO_CUSTOMER_ID] == "CUST-001"


def test_the_cli_needs_no_preflight(open_server: CodecServer) -> None:
    """`temporal workflow show --codec-endpoint`: no Origin, so no CORS headers either."""
    sealed = codec.EncryptionCodec(KEYS).encrypt(PLAIN)
    answer = call(
        open_server,
        "POST",
        "/decode",
        as_json(sealed),
        {"Content-Type": "application/json", "X-Namespace": "default"},
    )
    assert answer.status == 200
    assert from_json(answer) == [PLAIN]
    assert "access-control-allow-origin" not in answer.headers


def payload_texts(shown: str) -> str:
    """The data of every payload in `temporal workflow show -o json`'s output, which prints
    it in base64, as text."""
    return "\n".join(
        base64.b64decode(payload["data"]).decode("utf-8", "replace")
        for payload in json_payloads(shown)
    )


async def temporal_show(temporal_address: str, workflow_id: str, *flags: str) -> tuple[int, str]:
    """`temporal workflow show -o json` as an operator types it; (exit status, output)."""
    command = [venv_binary("temporal"), "workflow", "show", "--address", temporal_address]
    command += ["-w", workflow_id, "-o", "json", *flags]
    done = await run(*command, env=clean_environ())
    return done.returncode, done.stdout + done.stderr


async def test_temporal_workflow_show_decodes_through_it(
    temporal_address: str, stack: Stack, guarded_server: CodecServer, callers: Callers
) -> None:
    """The command in docs/operations.md: the CLI shows the order decrypted, given a token
    of a caller who may read orders; without the codec, sealed payloads only."""
    created = await stack.stub.CreateOrder(create_request(customer_email=SHOWN_EMAIL))
    endpoint = f"http://127.0.0.1:{guarded_server.port}"
    code, sealed = await temporal_show(temporal_address, created.workflow_id)
    assert code == 0, sealed
    assert base64.b64encode(codec.ENCODING).decode() in sealed  # metadata shows in base64
    assert SHOWN_EMAIL not in sealed + payload_texts(sealed)
    code, decoded = await temporal_show(
        temporal_address,
        created.workflow_id,
        "--codec-endpoint",
        endpoint,
        "--codec-auth",
        f"Bearer {callers.reader}",
    )
    assert code == 0, decoded
    assert SHOWN_EMAIL in payload_texts(decoded)
    assert created.order_id in payload_texts(decoded)
    # Without the token the CLI is refused (401, test_with_tokens_only_callers_who_may_read_...),
    # retries for about 15 s and ends with "context deadline exceeded": not run here for that.


def test_another_origin_gets_no_cors(open_server: CodecServer) -> None:
    for origin in ("http://evil.example", "http://localhost:8234", "null"):
        preflight = call(
            open_server,
            "OPTIONS",
            "/decode",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status == 403
        assert "access-control-allow-origin" not in preflight.headers
        post = call(open_server, "POST", "/decode", as_json(PLAIN), {"Origin": origin})
        assert post.status == 403
        assert "access-control-allow-origin" not in post.headers


@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        b"",
        b'{"payloads": 5}',
        b'{"payloads": [{"data": "not base64!"}]}',
        b'{"other": []}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
    ids=["text", "empty", "not-a-list", "bad-base64", "unknown-field", "not-utf8", "deep"],
)
def test_garbage_is_400_and_never_a_traceback(open_server: CodecServer, body: bytes) -> None:
    answer = ui_post(open_server, "/decode", body)
    assert answer.status == 400
    assert answer.headers["access-control-allow-origin"] == UI  # so the UI can show why
    assert "error" in answer.json()
    assert "Traceback" not in answer.body.decode()


def test_a_payload_it_cannot_decrypt_is_400_naming_the_key(open_server: CodecServer) -> None:
    stranger = new_keys()
    sealed = codec.EncryptionCodec(stranger).encrypt(PLAIN)
    answer = ui_post(open_server, "/decode", as_json(PLAIN, sealed))
    assert answer.status == 400
    assert (
        f"payload 1: payload encrypted with key {stranger.encrypt_with!r}" in answer.json()["error"]
    )
    for key in (*stranger.payload_keys.values(), *KEYS.payload_keys.values()):
        assert base64.b64encode(key) not in answer.body


def test_sizes_paths_and_methods(open_server: CodecServer) -> None:
    # Refused on its Content-Length, before a byte of it is read.
    connection = http.client.HTTPConnection("127.0.0.1", open_server.port, timeout=10)
    connection.putrequest("POST", "/decode")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    assert call(open_server, "POST", "/other", as_json(PLAIN)).status == 404
    assert call(open_server, "GET", "/decode").status == 405
    # A trailing slash, as an endpoint configured with one would send, still works.
    assert call(open_server, "POST", "/decode/", as_json(PLAIN)).status == 200


# --- Who may decode --------------------------------------------------------------------------


def test_with_tokens_only_callers_who_may_read_orders_decode(
    guarded_server: CodecServer, callers: Callers
) -> None:
    sealed = as_json(codec.EncryptionCodec(KEYS).encrypt(PLAIN))
    for path in ("/decode", "/encode"):
        missing = ui_post(guarded_server, path, sealed)
        assert missing.status == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.headers["access-control-allow-origin"] == UI
        assert ui_post(guarded_server, path, sealed, token="ord_not-a-token").status == 401
        expired = ui_post(guarded_server, path, sealed, token=callers.expired)
        assert expired.status == 401
        assert "expired" in expired.json()["error"]
        refused = ui_post(guarded_server, path, sealed, token=callers.payments)
        assert refused.status == 403
        assert "gateway may not call GetOrder" in refused.json()["error"]
    allowed = ui_post(guarded_server, "/decode", sealed, token=callers.reader)
    assert allowed.status == 200
    assert from_json(allowed) == [PLAIN]
    malformed = call(
        guarded_server, "POST", "/decode", sealed, {"Authorization": f"Basic {callers.reader}"}
    )
    assert malformed.status == 401


def test_beyond_loopback_it_needs_tokens_and_a_tls_proxy(callers: Callers) -> None:
    with pytest.raises(ValidationError, match="without --auth-tokens-file"):
        codec_settings(host="0.0.0.0")
    with pytest.raises(ValidationError, match="--allow-insecure-remote"):
        codec_settings(host="0.0.0.0", auth_tokens_file=callers.path)
    assert codec_settings(
        host="0.0.0.0", auth_tokens_file=callers.path, allow_insecure_remote=True
    ).allow_insecure_remote
    with pytest.raises(ValidationError, match="is not an origin"):
        codec_settings(allowed_origins="http://localhost:8233/path")


# --- python -m server.codec_server -------------------------------------------------------------


async def _run(*args: str, env: Mapping[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.codec_server",
        *args,
        cwd=ROOT,
        env=clean_environ({"PYTHONUNBUFFERED": "1", **env}),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def test_the_process_refuses_to_start_without_keys() -> None:
    process = await _run(env={})
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "no keys: give --keys-file or ORDER_KEYS_FILE" in stderr.decode()


async def test_the_process_serves_until_sigterm(tmp_path: Path) -> None:
    keys = keys_file(tmp_path)
    process = await _run("--port", "0", "--keys-file", str(keys), env={})
    assert process.stderr is not None
    seen = ""
    try:
        async with asyncio.timeout(30):
            while "anyone on this machine" not in seen:
                line = await process.stderr.readline()
                assert line, f"exited early:\n{seen}"
                seen += line.decode()
        match = re.search(r"Codec server at http://localhost:(\d+)", seen)
        assert match, seen
        port = int(match.group(1))

        def decode() -> int:
            connection = http.client.HTTPConnection("localhost", port, timeout=10)
            sealed = as_json(codec.EncryptionCodec(KEYS).encrypt(PLAIN))
            connection.request("POST", "/decode", body=sealed)
            status = connection.getresponse().status
            connection.close()
            return status

        assert await asyncio.to_thread(decode) == 200
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        code = await process.wait()
    assert code == 0, rest.decode()
    assert os.stat(keys).st_mode & 0o077 == 0


def test_help_lists_every_setting() -> None:
    text = CodecServerSettings.parser().format_help()
    for item in CodecServerSettings.settings():
        assert item.env in text
