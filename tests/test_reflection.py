"""Server reflection as clients use it: v1 and v1alpha, the error types, the proto's comments.

A raw client of each protocol (the request and response messages of v1 and
v1alpha are the same on the wire), buf curl as a real client that speaks v1
only, and grpcurl 1.8.6 (the newest on PyPI) as one that speaks v1alpha only.
The servers run in front of the servicer tests' stand-in for Temporal
(tests/support/fake_temporal.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2
from temporalio.client import Client

from acme.orders.v1 import order_service_pb2 as pb
from acme.orders.v1 import order_service_pb2_grpc as pb_grpc
from server import tokens as tokens_cli
from server.platform import tokens
from server.platform.app import OrderServer, api_descriptors, start_server
from tests.support.env import ROOT, run, venv_binary, with_changes
from tests.support.fake_temporal import CONFIG, FakeTemporal

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
SERVICE = "acme.orders.v1.OrderService"
SERVED = {SERVICE, "grpc.health.v1.Health", V1, V1ALPHA}
UNKNOWN_ORDER = pb.GetOrderRequest(order_id="ORD-0000000000000000")


def sent_detail_types() -> set[str]:
    """Every google.rpc detail type the server's code builds, read from its source."""
    source = "\n".join(path.read_text() for path in (ROOT / "server").rglob("*.py"))
    found = {
        f"google.rpc.{name}" for name in re.findall(r"error_details_pb2\.([A-Z][a-z]\w*)", source)
    }
    assert "google.rpc.ErrorInfo" in found, "the pattern no longer finds the detail types"
    return found


@asynccontextmanager
async def serving(**changes: Any) -> AsyncIterator[str]:
    """A server (reflection on unless changed) in front of a stand-in for Temporal; its target."""
    server: OrderServer = await start_server(
        with_changes(CONFIG, **changes), client=cast(Client, FakeTemporal())
    )
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0.1)


async def reflect(
    target: str, protocol: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream of `protocol` ("grpc.reflection.v1.ServerReflection" ...)."""
    async with grpc.aio.insecure_channel(target) as channel:
        info = channel.stream_stream(
            f"/{protocol}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return [response async for response in info(iter(requests))]


async def listed(target: str, protocol: str) -> set[str]:
    [response] = await reflect(
        target, protocol, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    return {service.name for service in response.list_services_response.service}


async def files_for(
    target: str, protocol: str, symbol: str
) -> list[descriptor_pb2.FileDescriptorProto]:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    [response] = await reflect(target, protocol, request)
    assert not response.HasField("error_response"), f"{symbol}: {response.error_response}"
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


def pool_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    """A pool of exactly these files; KeyError-free only if they include all they import."""
    pool, pending, added = descriptor_pool.DescriptorPool(), list(files), set[str]()
    while pending:
        ready = [f for f in pending if set(f.dependency) <= added]
        assert ready, f"imports not sent: {[set(f.dependency) - added for f in pending]}"
        for file in ready:
            pool.Add(file)
            added.add(file.name)
            pending.remove(file)
    return pool


def leading_comments(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    return "".join(
        location.leading_comments
        for location in file.source_code_info.location
        if list(location.path) == path
    )


@pytest.mark.parametrize("protocol", [V1, V1ALPHA])
async def test_each_protocol_lists_and_resolves_what_clients_need(protocol: str) -> None:
    async with serving() as target:
        assert await listed(target, protocol) == SERVED
        symbols = [*sorted(SERVED), "acme.orders.v1.Order", "google.rpc.Status"]
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for symbol in [*symbols, *sorted(sent_detail_types())]:
            found = await files_for(target, protocol, symbol)
            pool = pool_of(found)  # the answer carries every file it imports
            assert pool.FindFileContainingSymbol(symbol).name == found[0].name
            files.update((file.name, file) for file in found)

    api = files["acme/orders/v1/order_service.proto"]
    # The comments (source info), for GUIs: the service's, CreateOrder's, ErrorInfo's.
    assert leading_comments(api, [6, 0]).startswith(" Creates, pays, cancels and reads orders.")
    assert "starts its workflow" in leading_comments(api, [6, 0, 2, 0])
    details = files["google/rpc/error_details.proto"]
    assert details.message_type[0].name == "ErrorInfo"
    assert "Describes the cause of the error" in leading_comments(details, [4, 0])
    # Every field's JSON name, so tools print proto3 JSON (orderId).
    [order] = [message for message in api.message_type if message.name == "Order"]
    assert {f.name: f.json_name for f in order.field}["order_id"] == "orderId"
    v1 = files["grpc/reflection/v1/reflection.proto"]
    assert v1.package == "grpc.reflection.v1"
    assert [s.name for s in v1.service] == ["ServerReflection"]
    [request] = [
        message for message in v1.message_type if message.name == "ServerReflectionRequest"
    ]
    assert {f.name: f.json_name for f in request.field}["list_services"] == "listServices"


async def test_a_reflection_only_client_decodes_the_error_details() -> None:
    """The status trailer of a failed call, decoded with nothing but v1 reflection's types."""
    async with serving() as target:
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.OrderServiceStub(channel).GetOrder(UNKNOWN_ORDER)
        trailers = cast(Iterable[tuple[str, bytes]], caught.value.trailing_metadata() or ())
        [raw] = [value for key, value in trailers if key == "grpc-status-details-bin"]
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for symbol in ["google.rpc.Status", *sorted(sent_detail_types())]:
            files.update((file.name, file) for file in await files_for(target, V1, symbol))
    pool = pool_of(files.values())

    def decode(name: str, data: bytes) -> Message:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name)).FromString(data)

    status: Any = decode("google.rpc.Status", raw)
    assert status.code == grpc.StatusCode.NOT_FOUND.value[0]
    details: dict[str, Any] = {
        any_.type_url.rpartition("/")[2]: decode(any_.type_url.rpartition("/")[2], any_.value)
        for any_ in status.details
    }
    assert details["google.rpc.ErrorInfo"].reason == "ORDER_NOT_FOUND"
    assert details["google.rpc.ResourceInfo"].resource_name == UNKNOWN_ORDER.order_id


async def test_v1_and_v1alpha_send_the_same_files() -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
        reflection_pb2.ServerReflectionRequest(file_by_filename="google/rpc/status.proto"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="acme.orders.v1.Nope"),
    ]
    async with serving() as target:
        v1 = await reflect(target, V1, *requests)
        v1alpha = await reflect(target, V1ALPHA, *requests)
    assert [r.SerializeToString() for r in v1] == [r.SerializeToString() for r in v1alpha]
    assert v1[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_served_descriptors_are_the_modules_own_plus_comments() -> None:
    """The descriptor set `make proto` writes describes what the *_pb2 modules were built from."""

    def bare(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
        copy = descriptor_pb2.FileDescriptorProto()
        copy.CopyFrom(file)
        copy.ClearField("source_code_info")
        messages = list(copy.message_type)
        while messages:
            message = messages.pop()
            for field in message.field:
                field.ClearField("json_name")
            messages.extend(message.nested_type)
        return copy

    documented = api_descriptors()
    names = {file.name for file in documented.file}
    assert {"acme/orders/v1/order_service.proto", "google/rpc/error_details.proto"} <= names
    for file in documented.file:
        assert file.source_code_info.location, f"{file.name} has no comments"
        module = descriptor_pb2.FileDescriptorProto()
        descriptor_pool.Default().FindFileByName(file.name).CopyToProto(module)
        assert bare(file) == bare(module), f"{file.name} differs from its module: make proto"


@pytest.mark.parametrize("protocol", [V1, V1ALPHA])
async def test_reflection_needs_no_token_where_the_api_does(protocol: str, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_cli.entry_toml("admin", tokens.new_token(), role="admin"))
    async with serving(auth_tokens_file=tokens_file) as target:
        assert await listed(target, protocol) == SERVED
        assert await files_for(target, protocol, SERVICE)
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.OrderServiceStub(channel).GetOrder(UNKNOWN_ORDER)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("with_tokens", [True, False], ids=["tokens", "no-tokens"])
async def test_reflection_off_is_unimplemented(with_tokens: bool, tmp_path: Path) -> None:
    changes: dict[str, Any] = {"reflection": False}
    if with_tokens:
        changes["auth_tokens_file"] = tmp_path / "tokens.toml"
        changes["auth_tokens_file"].write_text(
            tokens_cli.entry_toml("admin", tokens.new_token(), role="admin")
        )
    async with serving(**changes) as target:
        for protocol in (V1, V1ALPHA):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await listed(target, protocol)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, protocol


async def test_buf_curl_a_client_of_v1_only() -> None:
    """buf curl with `--reflect-protocol grpc-v1` never falls back to v1alpha."""
    buf = venv_binary("buf")
    v1_only = ["curl", "--protocol", "grpc", "--reflect-protocol", "grpc-v1"]
    async with serving() as target:
        services = await run(buf, *v1_only, "--list-services", f"http://{target}")
        assert services.returncode == 0, services.stderr
        assert set(services.stdout.split()) == SERVED
        # The schema of a call, from v1 reflection alone; the call itself fails as it should.
        data = '{"order_id": "ORD-0000000000000000"}'
        got = await run(buf, *v1_only, "-d", data, f"http://{target}/{SERVICE}/GetOrder")
    assert got.returncode != 0
    assert '"code": "not_found"' in got.stderr, got.stdout + got.stderr


async def test_grpcurl_a_client_of_v1alpha_only() -> None:
    """grpcurl 1.8.6: the services, the comments, the error details decoded."""
    grpcurl = venv_binary("grpcurl")
    async with serving() as target:
        services = await run(grpcurl, "-plaintext", target, "list")
        described = await run(grpcurl, "-plaintext", target, "describe", SERVICE)
        method = await run(grpcurl, "-plaintext", target, "describe", f"{SERVICE}.ConfirmPayment")
        missing = await run(grpcurl, "-plaintext", target, "describe", f"{SERVICE}.NoSuchMethod")
        data = '{"order_id": "ORD-0000000000000000"}'
        got = await run(grpcurl, "-plaintext", "-d", data, target, f"{SERVICE}/GetOrder")
    assert set(services.stdout.split()) == SERVED, services.stderr
    assert "// Creates, pays, cancels and reads orders." in described.stdout, described.stderr
    # A method too: the descriptor pool alone finds no methods.
    assert "rpc ConfirmPayment ( .acme.orders.v1.ConfirmPaymentRequest )" in method.stdout, (
        method.stderr
    )
    assert missing.returncode != 0
    assert '"reason":"ORDER_NOT_FOUND"' in got.stderr.replace(" ", ""), got.stderr


def test_the_docs_list_what_is_served() -> None:
    """Every `grpcurl ... list` in the docs shows the services served."""
    shown = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(
            r"^\$ grpcurl [^\n]* list\n(.*?)^(?:\$|```)", doc.read_text(), re.M | re.S
        ):
            assert set(block.split()) == SERVED, f"{doc.relative_to(ROOT)}: {block}"
            shown += 1
    assert shown >= 3  # README.md, docs/walkthrough.md, docs/security.md
