"""No customer's email, street address or id in plain text anywhere (issue 12, docs/decisions/0017).

One order goes the whole way (created, paid, delivered, its four emails sent) with a
distinctive email, street address and customer id. Then none of the three may be found
in the bytes of Temporal's own database file, in the histories and the visibility rows
as a client without the keys gets them (what the Web UI and `temporal workflow show`
show), nor in a line the server or the worker logged at INFO. Through the keys, all
three are there. Each search is first shown to find what it looks for (the order id,
the masked email), so that finding nothing means something. Through the codec server,
as the Web UI decodes it, the same history shows all three.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from tests.support.codec_server import open_codec_server
from tests.support.env import venv_binary
from tests.support.keys import KEYS
from tests.support.logs import captured_logs
from tests.support.orders import create_request, email_workflows, payment_request
from tests.support.payloads import json_payloads
from tests.support.polling import eventually
from tests.support.stack import open_stack, order_reaching
from workflows import search_attributes
from workflows.models import OrderInput, OrderState

S = pb.OrderStatus


@dataclass(frozen=True)
class DevServer:
    """A dev server of this module's own, its state in a SQLite file the test can read."""

    env: WorkflowEnvironment
    db: Path

    def stored_bytes(self) -> bytes:
        """The database and its write-ahead log as they are on disk now."""
        files = [self.db, *(self.db.with_name(self.db.name + s) for s in ("-wal", "-shm"))]
        return b"".join(path.read_bytes() for path in files if path.exists())


@pytest_asyncio.fixture(scope="module")
async def dev_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevServer]:
    db = tmp_path_factory.mktemp("temporal-db") / "temporal.db"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=venv_binary("temporal"),
        dev_server_log_level="error",
        dev_server_database_filename=str(db),
        search_attributes=search_attributes.ALL,
    )
    try:
        yield DevServer(env, db)
    finally:
        await env.shutdown()


def decode_through_codec_server(history_json: str) -> str:
    """The history's payloads POSTed to a codec server's /decode, as the Web UI does; their
    data as text."""
    with open_codec_server() as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"payloads": json_payloads(history_json)})
        connection.request(
            "POST",
            "/decode",
            body,
            {"Content-Type": "application/json", "X-Namespace": "default"},
        )
        response = connection.getresponse()
        answer = response.read()
        connection.close()
    assert response.status == 200, answer
    return "\n".join(
        base64.b64decode(payload.get("data", "")).decode("utf-8", "replace")
        for payload in json.loads(answer)["payloads"]
    )


def found(needles: dict[str, str], haystack: bytes) -> list[str]:
    return [name for name, needle in needles.items() if needle.encode() in haystack]


async def test_no_email_address_or_customer_id_in_plain_text_anywhere(
    dev_server: DevServer, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:10]
    email = f"zq-pii-{tag}@example.com"
    street = f"77 Zqwxv Lane {tag}"
    customer = f"ZQCUST-{tag.upper()}"
    personal = {"email": email, "street address": street, "customer id": customer}
    plain: Client = dev_server.env.client  # no codec: what Temporal holds, as it holds it

    with captured_logs("text", "json") as logs:
        async with open_stack(plain, tmp_path / "outbox") as stack:
            created = await stack.stub.CreateOrder(
                create_request(customer_id=customer, customer_email=email, shipping_address=street)
            )
            order_id, workflow_id = created.order_id, created.workflow_id
            await stack.stub.ConfirmPayment(payment_request(order_id))
            await order_reaching(stack, order_id, S.ORDER_STATUS_DELIVERED)
            emails = await email_workflows(stack.client, workflow_id)  # the order has closed
            # ListOrders by customer finds it, and shows the id (from the encrypted memo).
            listed = await eventually(
                lambda: stack.stub.ListOrders(pb.ListOrdersRequest(customer_id=customer)),
                lambda page: [o.order_id for o in page.orders] == [order_id],
            )
            assert listed.orders[0].customer_id == customer
            assert listed.orders[0].status == S.ORDER_STATUS_DELIVERED
            # Through the keys, the order holds all three.
            handle = stack.client.get_workflow_handle(workflow_id)
            history = await handle.fetch_history()
            started = history.events[0].workflow_execution_started_event_attributes
            [order] = await stack.client.data_converter.decode(started.input.payloads, [OrderInput])
            assert (order.customer_email, order.shipping.address) == (email, street)
            assert order.customer_id == customer
            state = await (await handle.describe()).memo_value(
                search_attributes.MEMO_ORDER_STATE, type_hint=OrderState
            )
            assert (state.customer_email, state.shipping.address) == (email, street)
    hashed = search_attributes.customer_key(KEYS.customer_id_key, customer)
    leaks: dict[str, list[str]] = {}  # where → what of the three was found there

    # (a) Temporal's database file.
    stored = dev_server.stored_bytes()
    assert order_id.encode() in stored
    assert hashed.encode() in stored
    leaks["the dev server's database file"] = found(personal, stored)

    # (b) The histories and the visibility rows, read without the keys.
    for raw_history in [await plain.get_workflow_handle(workflow_id).fetch_history(), *emails]:
        events = b"".join(event.SerializeToString() for event in raw_history.events)
        assert order_id.encode() in events
        leaks[f"{raw_history.workflow_id}'s history"] = found(personal, events)
        # As `temporal workflow show -o json` prints it (payload data in base64).
        leaks[f"{raw_history.workflow_id}'s history as JSON"] = found(
            personal, raw_history.to_json().encode()
        )
    rows = [row async for row in plain.list_workflows(f"WorkflowId = '{workflow_id}'")]
    assert len(rows) == 1
    leaks["its visibility row"] = found(personal, rows[0].raw_info.SerializeToString())
    described = await plain.get_workflow_handle(workflow_id).describe()
    leaks["its description"] = found(personal, described.raw_description.SerializeToString())

    # (c) What the server and the worker logged: the email only masked.
    logged = "".join(out.getvalue() for out in logs)
    assert f"emailed 'Order Delivered: {order_id}' to z***@example.com" in logged
    assert f'"order_id": "{order_id}"' in logged  # the JSON lines too
    leaks["the server's and the worker's logs"] = found(personal, logged.encode())

    assert {where: what for where, what in leaks.items() if what} == {}

    # (d) Through the codec server, as the Web UI shows it, the same history holds all three.
    raw = await plain.get_workflow_handle(workflow_id).fetch_history()
    decoded = await asyncio.to_thread(decode_through_codec_server, raw.to_json())
    assert found(personal, decoded.encode()) == list(personal)
    # The customer's search attribute is the keyed hash, as the workflow left it.
    assert rows[0].typed_search_attributes.get(search_attributes.ORDER_CUSTOMER_ID) == hashed
