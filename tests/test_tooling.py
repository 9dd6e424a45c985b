"""The service as people reach it: grpcurl over reflection, the Temporal CLI, generated code."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from tests.support.codec_server import open_codec_server
from tests.support.env import ROOT, clean_environ, run, venv_binary
from tests.support.orders import create_request
from tests.support.stack import Stack, order_reaching

SERVICE = "acme.orders.v1.OrderService"


async def grpcurl(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await run(venv_binary("grpcurl"), "-plaintext", *args[:-1], stack.target, args[-1])


async def test_grpcurl_lists_and_describes_without_proto_files(stack: Stack) -> None:
    listed = await run(venv_binary("grpcurl"), "-plaintext", stack.target, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {SERVICE, "grpc.health.v1.Health"} <= services

    described = await run(
        venv_binary("grpcurl"), "-plaintext", stack.target, "describe", "acme.orders.v1.Order"
    )
    assert described.returncode == 0, described.stderr
    assert ".google.type.Money total_amount" in described.stdout


async def test_grpcurl_walkthrough(stack: Stack) -> None:
    """The README's grpcurl calls, in JSON, as a person would type them."""
    order = {
        "customer_id": "CUST-001",
        "items": [
            {
                "product_id": "PROD-123",
                "product_name": "Laptop",
                "quantity": 1,
                "price": {"currency_code": "USD", "units": 999, "nanos": 990000000},
            }
        ],
        "shipping_address": "123 Main St",
        "shipping_city": "San Francisco",
        "shipping_postal_code": "94102",
        "shipping_country": "USA",
    }
    created = await grpcurl(stack, "-d", json.dumps(order), f"{SERVICE}/CreateOrder")
    assert created.returncode == 0, created.stderr
    reply = json.loads(created.stdout)
    order_id = reply["orderId"]
    assert reply["status"] == "ORDER_STATUS_PENDING"
    assert reply["totalAmount"] == {"currencyCode": "USD", "units": "999", "nanos": 990000000}

    payment = {
        "order_id": order_id,
        "transaction_id": "TXN-12345",
        "amount": {"currency_code": "USD", "units": 999, "nanos": 990000000},
        "payment_method": "credit_card",
    }
    paid = await grpcurl(stack, "-d", json.dumps(payment), f"{SERVICE}/ConfirmPayment")
    assert paid.returncode == 0, paid.stderr
    await order_reaching(stack, order_id, pb.OrderStatus.ORDER_STATUS_DELIVERED)

    got = await grpcurl(stack, "-d", json.dumps({"order_id": order_id}), f"{SERVICE}/GetOrder")
    assert got.returncode == 0, got.stderr
    full = json.loads(got.stdout)
    assert full["status"] == "ORDER_STATUS_DELIVERED"
    assert full["shipmentInfo"]["trackingNumber"].startswith(f"FEDEX-{order_id}-")

    wrong = await grpcurl(
        stack, "-d", json.dumps({"order_id": "ORD-0000000000000000"}), f"{SERVICE}/GetOrder"
    )
    assert wrong.returncode != 0
    assert "Code: NotFound" in wrong.stderr or "Code: NotFound" in wrong.stdout


async def test_grpcurl_health(stack: Stack) -> None:
    checked = await grpcurl(
        stack, "-d", json.dumps({"service": SERVICE}), "grpc.health.v1.Health/Check"
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}


async def test_temporal_cli_uses_the_seed_names(
    stack: Stack, temporal: WorkflowEnvironment
) -> None:
    """`temporal workflow signal/query` work with the seed's handler names.

    Answers are encrypted: the CLI reads them through the codec server, as
    docs/operations.md shows. A signal's plain JSON input is read as it is.
    """
    created = await stack.stub.CreateOrder(create_request())
    address = temporal.client.service_client.config.target_host
    temporal_cli = venv_binary("temporal")
    with open_codec_server() as codec_server:
        await _use_the_seed_names(stack, created, temporal_cli, address, codec_server.url)


async def _use_the_seed_names(
    stack: Stack, created: pb.CreateOrderResponse, temporal_cli: str, address: str, codec: str
) -> None:
    common = ["--workflow-id", created.workflow_id, "--address", address, "--codec-endpoint", codec]

    queried = await run(
        temporal_cli, "workflow", "query", *common, "--name", "get_order_status", "-o", "json"
    )
    assert queried.returncode == 0, queried.stderr
    assert "pending" in queried.stdout

    signalled = await run(
        temporal_cli, "workflow", "signal", *common, "--name", "cancel_order",
        "--input", json.dumps({"reason": "Cancelled from the CLI"}),
    )  # fmt: skip
    assert signalled.returncode == 0, signalled.stderr
    order = await order_reaching(stack, created.order_id, pb.OrderStatus.ORDER_STATUS_CANCELLED)
    assert order.cancellation_reason == "Cancelled from the CLI"

    for name in ("get_full_state", "get_estimated_delivery"):
        result = await run(temporal_cli, "workflow", "query", *common, "--name", name, "-o", "json")
        assert result.returncode == 0, result.stderr


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """generated/ is exactly what `make proto` makes from protos/."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh, committed = tmp_path / "acme", ROOT / "generated" / "acme"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_files = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh_files == committed_files, "generated/ is stale: run `make proto`"
    for rel in fresh_files:
        assert filecmp.cmp(fresh / rel, committed / rel, shallow=False), (
            f"generated/acme/{rel} is stale: run `make proto`"
        )


def test_generated_package_imports_on_its_own(tmp_path: Path) -> None:
    """Another service imports the stubs with nothing but the installed package."""
    code = (
        "from acme.orders.v1 import order_service_pb2, order_service_pb2_grpc\n"
        "print(order_service_pb2_grpc.OrderServiceStub.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OrderServiceStub"


# What the fresh venv reports: the package's own metadata and its dependencies'.
_INSTALLED_REPORT = """
import json, importlib.metadata as md
from acme.orders.v1 import order_service_pb2 as pb, order_service_pb2_grpc as pb_grpc
request = pb.CreateOrderRequest(customer_id="CUST-001")
assert pb.CreateOrderRequest.FromString(request.SerializeToString()) == request
dist = md.distribution("acme-orders-api")
deps = [r.split(">")[0].split("=")[0].split("<")[0].strip() for r in dist.requires or []]
print(json.dumps({
    "module": pb.__file__,
    "stub": pb_grpc.OrderServiceStub.__name__,
    "requires_python": dist.metadata["Requires-Python"],
    "deps": {d: md.distribution(d).metadata["Requires-Python"] for d in deps},
}))
"""


def test_pip_install_generated_alone(tmp_path: Path) -> None:
    """`pip install ./generated` into a fresh venv, from the package index: the API alone works.

    Also that its python_requires holds for what it needs: a package that
    claims a Python its dependencies refuse cannot be installed there.
    """
    source = tmp_path / "generated"
    shutil.copytree(
        ROOT / "generated", source, ignore=shutil.ignore_patterns("__pycache__", "build")
    )
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    env = clean_environ({"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    env.pop("PYTHONPATH", None)
    for command in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
    ):
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False
        )
        assert done.returncode == 0, f"{command}: {done.stderr[-3000:]}"

    report = subprocess.run(
        [str(python), "-c", _INSTALLED_REPORT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    found = json.loads(report.stdout)
    assert Path(found["module"]).is_relative_to(venv), found["module"]  # not this checkout's
    assert found["stub"] == "OrderServiceStub"
    declared = SpecifierSet(found["requires_python"])
    oldest = min(
        (Version(spec.version) for spec in declared if spec.operator in (">=", "~=")),
        default=None,
    )
    assert oldest is not None, f"requires-python {declared} names no oldest Python"
    for dependency, needs in found["deps"].items():
        assert needs is None or oldest in SpecifierSet(needs), (
            f"generated/pyproject.toml allows Python {oldest}, but {dependency} needs {needs}"
        )
