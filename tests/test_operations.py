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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from temporalio.service import TLSConfig

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from infra import logs, temporal_client
from infra.temporal_client import bind_address
from server.platform.settings import ServerSettings
from tests.support.env import ROOT, free_port, settings_from
from tests.support.keys import key_variables
from tests.support.orders import LAPTOP_PRICE, create_request
from tests.support.polling import eventually
from tests.support.proxy import Proxy
from worker.settings import WorkerSettings

# --- The connection settings -----------------------------------------------------------


def server_args(argv: list[str], environ: dict[str, str]) -> ServerSettings:
    return settings_from(ServerSettings, argv, environ)


def worker_args(argv: list[str], environ: dict[str, str]) -> WorkerSettings:
    return settings_from(WorkerSettings, argv, environ)


def test_defaults_are_the_plain_text_dev_server() -> None:
    for settings in (server_args([], {}), worker_args([], {})):
        assert settings.temporal_connect_config() == {
            "target_host": "localhost:7233",
            "namespace": "default",
            "tls": False,
        }


def test_the_temporal_cli_variables_then_flags_win() -> None:
    env = {
        "TEMPORAL_ADDRESS": "orders.a1b2c.tmprl.cloud:7233",
        "TEMPORAL_NAMESPACE": "orders.a1b2c",
        "TEMPORAL_API_KEY": "key-from-env",
        "TEMPORAL_TLS_SERVER_NAME": "frontend.internal",
    }
    for parse in (server_args, worker_args):
        config = parse([], env).temporal_connect_config()
        assert (config["target_host"], config["namespace"], config["api_key"]) == (
            "orders.a1b2c.tmprl.cloud:7233",
            "orders.a1b2c",
            "key-from-env",
        )
        assert config["tls"] == TLSConfig(domain="frontend.internal")
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
        config = parse(
            flags[:-2], {**env, "TEMPORAL_TLS_SERVER_NAME": ""}
        ).temporal_connect_config()
        assert (config["target_host"], config["namespace"], config["api_key"]) == (
            "temporal.internal:7233",
            "shop",
            "key-from-flag",
        )
        assert config["tls"] is False
        # --temporal-namespace is the same setting as --namespace.
        assert parse(["--temporal-namespace", "eu"], {}).temporal_connection.namespace == "eu"


def test_an_api_key_implies_tls_as_for_temporal_cloud() -> None:
    env = {"TEMPORAL_ADDRESS": "x.tmprl.cloud:7233", "TEMPORAL_API_KEY": "k"}
    config = server_args([], env).temporal_connect_config()
    assert (config["tls"], config["api_key"]) == (True, "k")
    # Unless TLS is turned off, e.g. for a local proxy that adds it.
    assert server_args(["--no-temporal-tls"], env).temporal_connect_config()["tls"] is False
    assert worker_args([], {"TEMPORAL_TLS": "true"}).temporal_connect_config()["tls"]


def test_tls_files_are_read_into_the_client_tls_config(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes(f"--- {name} ---".encode())
    env = {
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "ca.pem"),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
        "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
    }
    settings = server_args([], env)
    assert settings.describe_temporal() == "localhost:7233 (namespace default, mTLS)"
    assert settings.temporal_connect_config()["tls"] == TLSConfig(
        server_root_ca_cert=b"--- ca.pem ---",
        client_cert=b"--- client.pem ---",
        client_private_key=b"--- client.key ---",
        domain="temporal.internal",
    )
    # A certificate without its key is refused before anything connects.
    with pytest.raises(SystemExit):
        worker_args(["--temporal-tls-cert-path", str(tmp_path / "client.pem")], {})
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(OSError, match=r"cannot read a Temporal TLS file: .*ca\.pem"):
        settings.temporal_connect_config()


def test_profiles_pem_data_and_grpc_metadata_come_from_envconfig(tmp_path: Path) -> None:
    config_file = tmp_path / "temporal.toml"
    config_file.write_text(
        '[profile.default]\naddress = "default.internal:7233"\n'
        '[profile.prod]\naddress = "prod.internal:7233"\nnamespace = "orders-prod"\n'
        '[profile.prod.tls]\nserver_name = "prod.frontend"\n'
    )
    env = {"TEMPORAL_CONFIG_FILE": str(config_file)}
    assert server_args([], env).temporal_connection.address == "default.internal:7233"
    prod = server_args(["--temporal-profile", "prod"], env)
    assert prod.describe_temporal() == "prod.internal:7233 (namespace orders-prod, TLS)"
    assert prod.temporal_connect_config()["tls"] == TLSConfig(domain="prod.frontend")
    # The variables win over the profile, and the flags over both.
    env |= {"TEMPORAL_PROFILE": "prod", "TEMPORAL_NAMESPACE": "from-env"}
    assert worker_args([], env).temporal_connection.namespace == "from-env"
    assert worker_args(["--namespace", "flag"], env).temporal_connection.namespace == "flag"
    data = server_args(
        [], {"TEMPORAL_TLS_SERVER_CA_CERT_DATA": "PEM", "TEMPORAL_GRPC_META_X_TENANT": "eu"}
    ).temporal_connect_config()
    assert data["tls"] == TLSConfig(server_root_ca_cert=b"PEM")
    assert data["rpc_metadata"] == {"x-tenant": "eu"}


def test_the_api_key_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"TEMPORAL_ADDRESS": "x.tmprl.cloud:7233", "TEMPORAL_API_KEY": "sekrit-api-key"}
    settings = server_args([], env)
    assert "sekrit" not in repr(settings)
    assert settings.describe_temporal() == "x.tmprl.cloud:7233 (namespace default, TLS, API key)"
    with pytest.raises(SystemExit):
        server_args(["--help"], env)
    assert "sekrit" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("parse", "argv", "environ"),
    [
        (worker_args, [], {"TEMPORAL_TLS": "maybe"}),
        (server_args, [], {"TEMPORAL_ADDRESS": "  "}),
        (server_args, ["--temporal-address", ""], {}),
        (server_args, ["--temporal-profile", "nope"], {}),
        (server_args, [], {"TEMPORAL_CONFIG_FILE": "/nonexistent/temporal.toml"}),
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
    settings = server_args(["--log-format", "json", "--metrics-port", "0"], {})
    assert (settings.log_format, settings.log_level) == ("json", "INFO")
    assert (settings.metrics_port, settings.metrics_host) == (0, None)
    env = {
        "ORDER_LOG_FORMAT": "json",
        "ORDER_LOG_LEVEL": "debug",
        "ORDER_WORKER_METRICS_PORT": "9464",
        "ORDER_WORKER_METRICS_HOST": "0.0.0.0",
    }
    worker = worker_args([], env)
    assert (worker.log_format, worker.log_level) == ("json", "DEBUG")
    assert (worker.metrics_port, worker.metrics_host) == (9464, "0.0.0.0")
    assert worker_args(["--log-format", "text", "--metrics-port", "9000"], env).log_format == (
        "text"
    )


def test_json_lines_carry_the_rpc_and_its_order() -> None:
    out = io.StringIO()
    handler = logs.handler("json", out)
    log = logging.getLogger("tests.operations.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)

    async def rpc() -> None:
        with logs.rpc_context("GetOrder"):
            log.warning("no order in the request")
        with logs.rpc_context("GetOrder", "ORD-1"):
            log.info("about %s", "an order")

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
        "message": "about an order",
        "rpc": "GetOrder",
        "order_id": "ORD-1",
        "workflow_id": "order-ORD-1",
    }
    assert "rpc" not in third
    assert (third["order_id"], third["workflow_id"]) == ("ORD-2", "order-ORD-2")
    assert first["time"].endswith("+00:00")


# --- A real mutual-TLS connection -------------------------------------------------------


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

    # A TLS-terminating proxy in front of the dev server (plain text).
    async with Proxy(temporal_address, tls=context) as proxy:
        env = {
            "TEMPORAL_ADDRESS": proxy.address,
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(tmp_path / "ca.pem"),
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "client.pem"),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "client.key"),
            "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
        }
        settings = worker_args([], env)
        client = await asyncio.wait_for(temporal_client.connect(settings), timeout=15)
        assert await client.service_client.check_health()
        async for _ in client.list_workflows(page_size=1):
            break
        # Without the client certificate the proxy refuses the handshake.
        del env["TEMPORAL_TLS_CLIENT_CERT_PATH"], env["TEMPORAL_TLS_CLIENT_KEY_PATH"]
        anonymous = worker_args([], env)
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(temporal_client.connect(anonymous), timeout=15)


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
    common |= key_variables()
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
            # Generous: on a loaded machine the cancel can take seconds to reach the handler.
            within=30,
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
        # The order's workflow completes once delivered; its emails are workflows of their own.
        def completed() -> float:
            samples = scrape(worker_metrics)
            return value(
                samples,
                "temporal_workflow_completed",
                task_queue=task_queue,
                workflow_type="OrderWorkflow",
            )

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
        # The order's workflow, or one of its email workflows.
        assert entry["order_id"] == order_id, entry
        assert entry["workflow_id"].partition("/email/")[0] == f"order-{order_id}", entry
    missing_lines = list(lines_about(server_lines, "ORD-0000000000000000"))
    assert {entry["rpc"] for entry in missing_lines} == {"GetOrder", "WatchOrder"}
