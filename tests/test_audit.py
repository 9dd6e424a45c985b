"""The audit trail: every line of a call names its caller, and every write gets one `audit` line.

Through real gRPC against a server taking tokens and JWTs, with the server's own
log formats (text and JSON, as `infra.logs.configure` sets them up): who (a
tokens-file name, `jwt:` and a keyed hash for an end user, `-` for no valid
credentials), what RPC, which order, and the outcome, for writes that succeed
and writes refused at every stage. An end user's id never appears in clear.
"""

from __future__ import annotations

import json
import uuid

from acme.orders.v1 import order_service_pb2 as pb
from server.platform import jwt_auth
from tests.support.access import code_of
from tests.support.jwt import Guarded, guarded_fixture
from tests.support.keys import KEYS
from tests.support.logs import captured_logs
from tests.support.orders import create_request, payment_request
from tests.support.stack import bearer

guarded = guarded_fixture("audit")


async def test_every_write_is_audited_and_every_line_names_its_caller(guarded: Guarded) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    own, other = f"CUST-AUD-{tag}", f"CUST-OTH-{tag}"
    end_user = jwt_auth.caller_name(own, KEYS.customer_id_key)
    stub, customer = guarded.stub, guarded.customer(own)
    admin = guarded.system("admin")
    theirs = (await stub.CreateOrder(create_request(customer_id=other), metadata=admin)).order_id

    with captured_logs("text", "json") as (text_out, json_out):
        mine = await stub.CreateOrder(
            create_request(customer_id=own), metadata=guarded.system("storefront")
        )
        order_id = mine.order_id
        # (caller, rpc, order, code) of each write, in order.
        writes = [("storefront", "CreateOrder", order_id, "OK")]
        paid = await code_of(
            stub.ConfirmPayment(payment_request(order_id), metadata=guarded.system("storefront"))
        )
        writes.append(("storefront", "ConfirmPayment", order_id, paid.name))
        cancelled = await code_of(
            stub.CancelOrder(pb.CancelOrderRequest(order_id=theirs), metadata=customer)
        )
        writes.append((end_user, "CancelOrder", theirs, cancelled.name))
        created = await code_of(
            stub.CreateOrder(create_request(customer_id=other), metadata=customer)
        )
        writes.append((end_user, "CreateOrder", "-", created.name))
        anonymous = await code_of(
            stub.CancelOrder(pb.CancelOrderRequest(order_id=order_id), metadata=bearer("ord_x"))
        )
        writes.append(("-", "CancelOrder", "-", anonymous.name))
        second = await stub.CreateOrder(create_request(customer_id=own), metadata=customer)
        writes.append((end_user, "CreateOrder", second.order_id, "OK"))
        gateway = await code_of(
            stub.ConfirmPayment(
                payment_request(second.order_id), metadata=guarded.system("payment-gateway")
            )
        )
        writes.append(("payment-gateway", "ConfirmPayment", second.order_id, gateway.name))
        own_cancel = await code_of(
            stub.CancelOrder(pb.CancelOrderRequest(order_id=order_id), metadata=customer)
        )
        writes.append((end_user, "CancelOrder", order_id, own_cancel.name))
        # Reads are not audited, but their lines name the caller too.
        await stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=customer)

    assert [code for *_, code in writes] == [
        "OK",
        "PERMISSION_DENIED",  # the storefront may not pay
        "NOT_FOUND",  # another customer's order
        "PERMISSION_DENIED",  # an order for another customer
        "UNAUTHENTICATED",
        "OK",
        "OK",
        "OK",
    ]
    lines = [json.loads(line) for line in json_out.getvalue().splitlines()]
    audit = [line for line in lines if line["logger"] == "audit"]
    assert [
        (line["caller"], line["rpc"], line.get("order_id", "-"), line["message"].split()[3])
        for line in audit
    ] == [(who, rpc, order, f"code={code}") for who, rpc, order, code in writes]
    for line, (who, rpc, order, code) in zip(audit, writes, strict=True):
        assert line["message"].startswith(
            f"caller={who} rpc={rpc} order_id={order} code={code} peer="
        )

    # Every line of a call names its caller: in JSON a field, in text at the end.
    of_calls = [line for line in lines if "rpc" in line]
    assert len(of_calls) > len(audit)
    assert all(line.get("caller") for line in of_calls), of_calls
    read = [line for line in of_calls if line["rpc"] == "GetOrder"]
    assert [line["caller"] for line in read] == [end_user]
    text = text_out.getvalue()
    get_order = [line for line in text.splitlines() if "server.rpc: rpc=GetOrder" in line]
    assert len(get_order) == 1
    assert get_order[0].endswith(f"caller={end_user}")
    assert f"audit: caller=storefront rpc=CreateOrder order_id={order_id} code=OK" in text

    # The end user is named by a keyed hash, never by its id (docs/decisions/0017).
    assert end_user.startswith("jwt:h1:")
    assert own not in text
    assert own not in json_out.getvalue()
