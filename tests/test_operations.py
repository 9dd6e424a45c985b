"""Operations: reaching Temporal beyond the dev server, metrics, structured logs.

- the Temporal connection settings (address, namespace, TLS, mutual TLS, API
  key) from flags and the Temporal CLI's variables, down to `Client.connect`;
- a real mutual-TLS connection, through a TLS-terminating proxy in front of
  the dev server (`temporal server start-dev` serves no TLS itself);
- `python -m server` and `python -m worker` as real processes with JSON logs
  and metrics ports: both endpoints scraped over HTTP, every log line about
  the order naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import ssl
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.service import TLSConfig

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import logs, temporal_connection
from infra.temporal_connection import TemporalConnection, connect_options
from infra.temporal_runtime import bind_address
from server.config import from_args as server_args
from tests.conftest import LAPTOP_PRICE, create_request, eventually
from tests.test_worker import free_port
from worker.config import from_args as worker_args

ROOT = Path(__file__).resolve().parent.parent

# --- The connection settings -----------------------------------------------------------


def test_defaults_are_the_plain_text_dev_server() -> None:
    for config in (server_args([], {}), worker_args([], {})):
        assert config.temporal == TemporalConnection("localhost:7233", "default")
        assert connect_options(config.temporal) == {
            "namespace": "default",
            "tls": False,
            "api_key": None,
        }


def test_the_temporal_cli_variables_then_flags_win() -> None:
    env = {
        "TEMPORAL_ADDRESS": "orders.a1b2c.tmprl.cloud:7233",
        "TEMPORAL_NAMESPACE": "orders.a1b2c",
        "TEMPORAL_API_KEY": "key-from-env",
        "TEMPORAL_TLS_SERVER_NAME": "frontend.internal",
    }
    for parse in (server_args, worker_args):
        connection = parse([], env).temporal
        assert connection == TemporalConnection(
            "orders.a1b2c.tmprl.cloud:7233",
            "orders.a1b2c",
            tls_server_name="frontend.internal",
            api_key="key-from-env",
        )
        flags = [
            "--temporal-address", "temporal.internal:7233",
            "--namespace", "shop",
            "--temporal-api-key", "key-from-flag",
            "--no-temporal-tls",
            "--temporal-tls-server-name", "ignored?",
        ]  # fmt: skip
        # TLS off with a TLS setting is a contradiction, refused with status 2.
        with pytest.raises(SystemExit) as caught:
            parse(flags, env)
        assert caught.value.code == 2
        connection = parse(flags[:-2], {**env, "TEMPORAL_TLS_SERVER_NAME": ""}).temporal
        assert (connection.address, connection.namespace, connection.api_key) == (
            "temporal.internal:7233",
            "shop",
            "key-from-flag",
        )
        assert connect_options(connection)["tls"] is False
        # --temporal-namespace is the same setting as --namespace.
        assert parse(["--temporal-namespace", "eu"], {}).temporal.namespace == "eu"


def test_an_api_key_implies_tls_as_for_temporal_cloud() -> None:
    options = connect_options(TemporalConnection("x.tmprl.cloud:7233", "x", api_key="k"))
    assert options == {"namespace": "x", "tls": True, "api_key": "k"}
    # Unless TLS is turned off, e.g. for a local proxy that adds it.
    options = connect_options(TemporalConnection("proxy:7233", tls=False, api_key="k"))
    assert options["tls"] is False
    assert worker_args([], {"TEMPORAL_TLS": "true"}).temporal.uses_tls


def test_tls_files_are_read_into_the_client_tls_config(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes(f"--- {name} ---".encode())
    env = {
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "ca.pem"),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
        "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
    }
    connection = server_args([], env).temporal
    assert connection.describe() == "localhost:7233 (namespace default, mTLS)"
    tls = connect_options(connection)["tls"]
    assert tls == TLSConfig(
        server_root_ca_cert=b"--- ca.pem ---",
        client_cert=b"--- client.pem ---",
        client_private_key=b"--- client.key ---",
        domain="temporal.internal",
    )
    # A certificate without its key is refused before anything connects.
    with pytest.raises(SystemExit):
        worker_args(["--temporal-tls-cert-path", str(tmp_path / "client.pem")], {})
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(OSError, match=r"server CA certificate .*ca\.pem"):
        connect_options(connection)


def test_the_api_key_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    connection = TemporalConnection("x.tmprl.cloud:7233", api_key="sekrit-api-key")
    assert "sekrit" not in repr(connection)
    assert "sekrit" not in repr(server_args([], {"TEMPORAL_API_KEY": "sekrit-api-key"}))
    assert connection.describe() == "x.tmprl.cloud:7233 (namespace default, TLS, API key)"
    with pytest.raises(SystemExit):
        server_args(["--help"], {"TEMPORAL_API_KEY": "sekrit-api-key"})
    assert "sekrit" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("parse", "argv", "environ"),
    [
        (worker_args, [], {"TEMPORAL_TLS": "maybe"}),
        (server_args, [], {"TEMPORAL_ADDRESS": "  "}),
        (server_args, ["--temporal-address", ""], {}),
        (server_args, [], {"ORDER_LOG_FORMAT": "xml"}),
        (worker_args, ["--log-level", "loud"], {}),
        (server_args, [], {"ORDER_METRICS_PORT": "http"}),
        (worker_args, [], {"ORDER_WORKER_METRICS_PORT": "0"}),
    ],
)
def test_bad_operations_settings_exit_with_usage(
    parse: Any, argv: list[str], environ: dict[str, str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse(argv, environ)
    assert caught.value.code == 2


def test_the_sdk_metrics_address_is_an_ip_literal() -> None:
    # Core parses a socket address, not a host name: names are resolved first.
    assert bind_address("localhost", 9464) in {"127.0.0.1:9464", "[::1]:9464"}
    assert bind_address("::", 9464) == "[::]:9464"
    assert bind_address("0.0.0.0", 9464) == "0.0.0.0:9464"
    with pytest.raises(OSError, match="cannot resolve"):
        bind_address("no-such-host.invalid", 9464)


def test_log_and_metrics_settings() -> None:
    config = server_args(["--log-format", "json", "--metrics-port", "0"], {})
    assert (config.log, config.metrics_port, config.metrics_host) == (
        logs.LogSettings("json", "INFO"),
        0,
        None,
    )
    env = {
        "ORDER_LOG_FORMAT": "json",
        "ORDER_LOG_LEVEL": "debug",
        "ORDER_WORKER_METRICS_PORT": "9464",
        "ORDER_WORKER_METRICS_HOST": "0.0.0.0",
    }
    worker = worker_args([], env)
    assert (worker.log, worker.metrics_port, worker.metrics_host) == (
        logs.LogSettings("json", "DEBUG"),
        9464,
        "0.0.0.0",
    )
    assert worker_args(["--log-format", "text", "--metrics-port", "9000"], env).log.format == (
        "text"
    )


def test_json_lines_carry_the_rpc_and_its_order() -> None:
    class Call:
        rpc = "GetOrder"
        order_id = ""
        workflow_id = ""

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.OrderContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("tests.operations.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)

    async def rpc() -> None:
        call = Call()
        logs.bind_rpc(call)
        log.warning("before validation")
        call.order_id, call.workflow_id = "ORD-1", "order-ORD-1"
        log.info("after %s", "validation")

    try:
        asyncio.run(rpc())
        log.error("outside any RPC", extra={"temporal_workflow": {"workflow_id": "order-ORD-2"}})
    finally:
        log.removeHandler(handler)
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["rpc"] == "GetOrder"
    assert "order_id" not in first
    assert (first["level"], first["logger"]) == ("WARNING", "tests.operations.json")
    assert {k: second[k] for k in ("message", "rpc", "order_id", "workflow_id")} == {
        "message": "after validation",
        "rpc": "GetOrder",
        "order_id": "ORD-1",
        "workflow_id": "order-ORD-1",
    }
    assert "rpc" not in third
    assert (third["order_id"], third["workflow_id"]) == ("ORD-2", "order-ORD-2")
    assert first["time"].endswith("+00:00")


# --- A real mutual-TLS connection -------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_proxy(target: str, context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS-terminating proxy on a free loopback port in front of `target` (plain text)."""
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_client_reaches_temporal_over_mutual_tls(
    temporal_address: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The certificate names a host other than the one dialled: the server name setting.
    ca.issue_cert("temporal.internal").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no entry
    context.set_alpn_protocols(["h2"])
    client_cert = ca.issue_cert("orders-worker@acme.example")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))

    async with tls_proxy(temporal_address, context) as port:
        env = {
            "TEMPORAL_ADDRESS": f"127.0.0.1:{port}",
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "ca.pem"),
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
            "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
        }
        connection = worker_args([], env).temporal
        client = await asyncio.wait_for(temporal_connection.connect(connection), timeout=15)
        assert await client.service_client.check_health()
        async for _ in client.list_workflows(page_size=1):
            break
        # Without the client certificate the proxy refuses the handshake.
        anonymous = TemporalConnection(
            f"127.0.0.1:{port}",
            tls_ca_path=tmp_path / "ca.pem",
            tls_server_name="temporal.internal",
        )
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(temporal_connection.connect(anonymous), timeout=15)


# --- Real processes: metrics and JSON logs ----------------------------------------------


class Process:
    """A `python -m ...` process whose stderr lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        assert process.stderr is not None
        self._reading = asyncio.create_task(self._read(process.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                code = await self.process.wait()
                await self._reading
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        return code

    def json_lines(self) -> list[dict[str, Any]]:
        """Every line, parsed: a line that is not one JSON object fails the test."""
        parsed = []
        for line in self.lines:
            entry = json.loads(line)
            assert isinstance(entry, dict), line
            parsed.append(entry)
        return parsed


async def start(module: str, *args: str, env: dict[str, str]) -> Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stderr=asyncio.subprocess.PIPE,
    )
    return Process(process)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample at http://127.0.0.1:port/metrics, by its name as exposed, and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:  # comments (# HELP, # TYPE) and blank lines
            continue
        name, labels, number = match.groups()
        key = frozenset(_LABEL.findall(labels or ""))
        samples[(name, key)] = float(number)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def lines_about(entries: list[dict[str, Any]], order_id: str) -> Iterator[dict[str, Any]]:
    for entry in entries:
        if order_id in entry["message"] or entry.get("order_id") == order_id:
            yield entry


async def test_processes_serve_metrics_and_log_json_naming_the_order(
    temporal_address: str, tmp_path: Path
) -> None:
    task_queue = f"orders-ops-{uuid.uuid4().hex[:8]}"
    grpc_port, server_metrics, worker_metrics = free_port(), free_port(), free_port()
    common = {"TEMPORAL_ADDRESS": temporal_address, "ORDER_TASK_QUEUE": task_queue}
    instant = {
        f"ORDER_SIM_{step}_SECONDS": "0"
        for step in ("INVENTORY", "PAYMENT", "PREPARE", "SHIP", "DELIVER", "EMAIL")
    }
    worker = await start(
        "worker",
        "--log-format", "json",
        "--metrics-port", str(worker_metrics),
        "--metrics-host", "127.0.0.1",
        env={**common, **instant, "ORDER_OUTBOX_DIR": str(tmp_path / "outbox")},
    )  # fmt: skip
    server = await start(
        "server",
        "--host", "127.0.0.1",
        "--port", str(grpc_port),
        "--metrics-port", str(server_metrics),
        env={**common, "ORDER_LOG_FORMAT": "json"},
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def health_status() -> int | None:
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:  # not listening yet
                    return None
                return int(response.status)

            await eventually(
                health_status,
                lambda status: status == health_pb2.HealthCheckResponse.SERVING,
                within=30,
            )
            await eventually(
                lambda: asyncio.sleep(0, result=list(worker.lines)),
                lambda lines: any("Worker polling" in line for line in lines),
                within=30,
            )
            orders = pb_grpc.OrderServiceStub(channel)
            created = await orders.CreateOrder(create_request(), timeout=10)
            order_id = created.order_id
            watch = orders.WatchOrder(pb.WatchOrderRequest(order_id=order_id), timeout=30)
            await orders.ConfirmPayment(
                pb.ConfirmPaymentRequest(
                    order_id=order_id,
                    transaction_id="TXN-OPS",
                    amount=LAPTOP_PRICE,
                    payment_method="credit_card",
                ),
                timeout=10,
            )
            statuses = [order.status async for order in watch]
            assert statuses[-1] == pb.ORDER_STATUS_DELIVERED
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await orders.GetOrder(pb.GetOrderRequest(order_id="ORD-0000000000000000"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as missing_stream:
                async for _ in orders.WatchOrder(
                    pb.WatchOrderRequest(order_id="ORD-0000000000000000"), timeout=10
                ):
                    pass
            assert missing_stream.value.code() == grpc.StatusCode.NOT_FOUND
            await orders.GetOrder(pb.GetOrderRequest(order_id=order_id), timeout=10)
            # A watcher that goes away: the stream ends CANCELLED on the server.
            pending = await orders.CreateOrder(create_request(), timeout=10)
            abandoned = orders.WatchOrder(pb.WatchOrderRequest(order_id=pending.order_id))
            first = await abandoned.read()
            assert isinstance(first, pb.Order)
            assert first.order_id == pending.order_id
            abandoned.cancel()

        # The gRPC server: requests, codes and latencies per RPC.
        rpc = {"grpc_service": "acme.orders.v1.OrderService"}
        handled = "grpc_server_handled_total"
        watch_labels = {"grpc_method": "WatchOrder", "grpc_type": "server_stream", **rpc}
        samples = await eventually(
            lambda: asyncio.to_thread(scrape, server_metrics),
            lambda samples: value(samples, handled, grpc_code="CANCELLED", **watch_labels) == 1,
            within=10,
        )
        assert value(samples, handled, grpc_method="GetOrder", grpc_code="NOT_FOUND", **rpc) == 1
        assert value(samples, handled, grpc_method="GetOrder", grpc_code="OK", **rpc) == 1
        assert value(samples, handled, grpc_method="CreateOrder", grpc_code="OK", **rpc) == 2
        assert value(samples, handled, grpc_method="ConfirmPayment", grpc_code="OK", **rpc) == 1
        assert value(samples, handled, grpc_method="WatchOrder", grpc_code="OK", **rpc) == 1
        assert value(samples, handled, grpc_code="NOT_FOUND", **watch_labels) == 1
        assert value(samples, "grpc_server_started_total", **watch_labels) == 3
        assert value(samples, "grpc_server_handling_seconds_count", grpc_method="GetOrder") == 2
        assert (
            value(samples, "grpc_server_handling_seconds_bucket", grpc_method="GetOrder", le="+Inf")
            == 2
        )
        # The health checks count too, under their own service.
        assert value(samples, handled, grpc_service="grpc.health.v1.Health", grpc_code="OK") >= 1
        assert value(samples, "process_cpu_seconds_total") > 0

        # The worker: the Temporal SDK's own series.
        # The workflow completes a moment after the order is delivered (its last emails).
        def completed() -> float:
            samples = scrape(worker_metrics)
            return value(samples, "temporal_workflow_completed", task_queue=task_queue)

        await eventually(lambda: asyncio.to_thread(completed), lambda n: n == 1, within=15)
        worker_samples = scrape(worker_metrics)
        assert (
            value(worker_samples, "temporal_request", operation="RespondWorkflowTaskCompleted") >= 1
        )
        assert (
            value(
                worker_samples,
                "temporal_activity_execution_latency_count",
                activity_type="charge_payment",
            )
            >= 1
        )
    finally:
        worker_code, server_code = await asyncio.gather(worker.stop(), server.stop())
    assert (worker_code, server_code) == (0, 0), "\n".join(worker.lines + server.lines)

    # Logs: one JSON object per line, and every line about the order names it.
    server_lines, worker_lines = server.json_lines(), worker.json_lines()
    for entry in server_lines + worker_lines:
        assert {"time", "level", "logger", "message"} <= entry.keys()
    about = list(lines_about(server_lines, order_id))
    assert {entry["rpc"] for entry in about} >= {"CreateOrder", "ConfirmPayment", "WatchOrder"}
    for entry in about:
        assert (entry["order_id"], entry["workflow_id"]) == (order_id, f"order-{order_id}"), entry
        assert entry["rpc"], entry
    about = list(lines_about(worker_lines, order_id))
    assert {entry.get("activity") for entry in about} >= {"reserve_inventory", "charge_payment"}
    for entry in about:
        assert (entry["order_id"], entry["workflow_id"]) == (order_id, f"order-{order_id}"), entry
    missing_lines = list(lines_about(server_lines, "ORD-0000000000000000"))
    assert {entry["rpc"] for entry in missing_lines} == {"GetOrder", "WatchOrder"}
