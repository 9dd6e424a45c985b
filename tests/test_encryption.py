"""Encrypted payloads (issue 12, docs/decisions/0017): what Temporal stores of an order is
unreadable without the keys, keys rotate, and orders from before encryption go on.

Orders go through the real path: gRPC, the server, Temporal, the worker, each encrypting
with the keys (tests/support/stack.py). The session's `temporal` client has no codec:
through it a test sees what Temporal's database, its Web UI and `temporal workflow show`
without --codec-endpoint see.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from acme.orders.v1 import order_service_pb2 as pb
from activities.order_activities import OrderActivities
from activities.providers import ProviderSettings
from infra import codec
from infra.keys import Keys, KeySettings, new_keys
from infra.keys import main as keys_main
from server.platform.app import start_server
from server.platform.settings import ServerSettings
from tests.support.env import ROOT, clean_environ
from tests.support.keys import KEYS, key_settings, keys_file, with_codec
from tests.support.orders import create_request, email_workflows, payment_request
from tests.support.payloads import payloads_in
from tests.support.polling import eventually
from tests.support.stack import Stack, async_stub, open_stack, order_reaching
from worker.app import build_worker
from workflows import search_attributes
from workflows.models import GET_ORDER_STATUS_QUERY, OrderInput, OrderState, OrderStatus

S = pb.OrderStatus
# What an order holds that is personal: none of it may be in Temporal's raw bytes.
EMAIL = "cust-001@example.com"
STREET = "123 Main St"
DECLINED = "declined_card"


# --- Every payload in a history -----------------------------------------------------------


def history_payloads(history: WorkflowHistory) -> list[tuple[str, Payload]]:
    return [
        (f"event {event.event_id} {where}", payload)
        for event in history.events
        for where, payload in payloads_in(event)
    ]


def is_search_attribute(where: str) -> bool:
    return ".search_attributes.indexed_fields[" in where


def is_patch_marker(where: str) -> bool:
    """The SDK's own record of a `workflow.patched` id (e.g. "state-in-memo"): no order data."""
    return "marker_recorded_event_attributes.details[patch-data]" in where


def readable_by_design(where: str) -> bool:
    return is_search_attribute(where) or is_patch_marker(where)


def key_ids(history: WorkflowHistory) -> set[str]:
    return {
        codec.key_id_of(payload)
        for _, payload in history_payloads(history)
        if codec.is_encrypted(payload)
    }


def raw_bytes(history: WorkflowHistory) -> bytes:
    return b"".join(event.SerializeToString() for event in history.events)


async def raw_history(temporal: WorkflowEnvironment, workflow_id: str) -> WorkflowHistory:
    """The history as Temporal stores it: read by the session's client, which has no codec."""
    return await temporal.client.get_workflow_handle(workflow_id).fetch_history()


# --- What Temporal holds of an order ----------------------------------------------------------


async def test_temporal_holds_no_readable_payload_of_an_order(
    temporal: WorkflowEnvironment, stack: Stack
) -> None:
    created = await stack.stub.CreateOrder(create_request(customer_email=EMAIL))
    await stack.stub.ConfirmPayment(payment_request(created.order_id))
    await order_reaching(stack, created.order_id, S.ORDER_STATUS_DELIVERED)
    # Emails handed to workflows of their own, if any (a slow mail server), are checked too.
    emails = await email_workflows(stack.client, created.workflow_id)

    history = await raw_history(temporal, created.workflow_id)
    payloads = history_payloads(history)
    kinds = {where.split(" ", 2)[2].split(".")[0] for where, _ in payloads}
    # Inputs, results, signals, the memo (at the start and each upsert) are all there...
    for kind in (
        "workflow_execution_started_event_attributes",
        "activity_task_scheduled_event_attributes",
        "activity_task_completed_event_attributes",
        "workflow_execution_signaled_event_attributes",
        "workflow_properties_modified_event_attributes",
        "workflow_execution_completed_event_attributes",
    ):
        assert kind in kinds, f"no payload in any {kind}"
    # ...and every one of them is sealed, with the key that encrypts now.
    for where, payload in payloads:
        if readable_by_design(where):
            continue
        assert payload.metadata["encoding"] == codec.ENCODING, where
        assert codec.key_id_of(payload) == KEYS.encrypt_with, where
        assert set(payload.metadata) == {"encoding", codec.KEY_ID}, where
    for email in emails:
        for where, payload in history_payloads(email):
            assert codec.is_encrypted(payload) or readable_by_design(where), where
    for raw in (raw_bytes(history), *(raw_bytes(email) for email in emails)):
        assert EMAIL.encode() not in raw
        assert STREET.encode() not in raw

    # Search attributes stay readable, as ListOrders needs them.
    started = history.events[0].workflow_execution_started_event_attributes
    indexed = started.search_attributes.indexed_fields
    assert indexed[search_attributes.ORDER_STATUS.name].data == b'"pending"'
    assert not codec.is_encrypted(indexed[search_attributes.ORDER_TOTAL_MICROS.name])

    # With the keys, the same history reads as before.
    handle = stack.client.get_workflow_handle(created.workflow_id, result_type=OrderState)
    state = await handle.result()
    assert isinstance(state, OrderState)
    assert state.customer_email == EMAIL
    assert state.shipping.address == STREET
    memo = await (await handle.describe()).memo_value(
        search_attributes.MEMO_ORDER_STATE, type_hint=OrderState
    )
    assert memo.status == OrderStatus.DELIVERED
    listed = await stack.stub.ListOrders(pb.ListOrdersRequest(customer_id="CUST-001"))
    assert created.order_id in [summary.order_id for summary in listed.orders]


async def test_failure_messages_are_sealed_too(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """A provider's error message may quote the customer (a refused address): sealed too."""
    simulation = ProviderSettings.instant(tmp_path, sim_decline_methods=frozenset({DECLINED}))
    async with open_stack(temporal.client, tmp_path, simulation=simulation) as stack:
        created = await stack.stub.CreateOrder(create_request())
        await stack.stub.ConfirmPayment(payment_request(created.order_id, payment_method=DECLINED))
        order = await order_reaching(stack, created.order_id, S.ORDER_STATUS_CANCELLED)
        assert "declined" in order.cancellation_reason.lower()
        history = await raw_history(temporal, created.workflow_id)
        [failed] = [
            e.activity_task_failed_event_attributes.failure
            for e in history.events
            if e.HasField("activity_task_failed_event_attributes")
        ]
        assert failed.message == "Encoded failure"
        assert DECLINED.encode() not in raw_bytes(history)
        assert codec.is_encrypted(failed.encoded_attributes)
        # The worker's and the server's converter read it back.
        error = await stack.client.data_converter.decode_failure(failed)
        assert DECLINED in str(error)


# --- The keys file and `python -m infra.keys` ---------------------------------------------


def test_new_makes_an_owner_only_file_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "secrets" / "keys.toml"
    assert keys_main(["new", str(path)]) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    keys = KeySettings(keys_file=path).keys
    assert list(keys.payload_keys) == [keys.encrypt_with]
    with pytest.raises(SystemExit) as exited:
        keys_main(["new", str(path)])
    assert exited.value.code == 2
    assert "exists; `rotate` adds a key to it" in capsys.readouterr().err
    assert KeySettings(keys_file=path).keys == keys  # untouched


def test_rotate_adds_a_key_that_encrypts_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    assert keys_main(["new", str(path)]) == 0
    before = KeySettings(keys_file=path).keys
    assert keys_main(["rotate", str(path)]) == 0
    after = KeySettings(keys_file=path).keys
    assert after.encrypt_with not in before.payload_keys
    assert {**before.payload_keys, after.encrypt_with: after.payload_keys[after.encrypt_with]} == (
        after.payload_keys
    )
    assert after.customer_id_key == before.customer_id_key  # never rotated (decision 0017)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name("keys.toml.new").exists()
    sealed = codec.EncryptionCodec(before).encrypt(Payload(data=b'"x"'))
    assert codec.EncryptionCodec(after).decrypt(sealed).data == b'"x"'


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("not toml =", "not TOML"),
        ('customer_id_key = "{key}"\n[payload_keys]\n"a" = "{key}"', "missing encrypt_with"),
        ('encrypt_with = "b"\ncustomer_id_key = "{key}"\n[payload_keys]\n"a" = "{key}"',
         "encrypt_with names 'b', which is not a payload key"),
        ('encrypt_with = "a"\ncustomer_id_key = "{key}"\n[payload_keys]\n"a" = "c2hvcnQ="',
         "key 'a' has 5 bytes; it needs 32"),
        ('encrypt_with = "a"\ncustomer_id_key = "no base64!"\n[payload_keys]\n"a" = "{key}"',
         "key 'customer_id_key' is not base64"),
        ('encrypt_with = "a"\ncustomer_id_key = "{key}"\npayload_keys = 5', "payload_keys must"),
    ],
    ids=["not-toml", "no-encrypt-with", "unknown-encrypt-with", "short", "not-base64", "table"],
)  # fmt: skip
def test_a_broken_keys_file_is_refused_naming_the_mistake_never_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, error: str
) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    path = tmp_path / "keys.toml"
    path.write_text(content.format(key=key))
    with pytest.raises(ValidationError) as caught:
        KeySettings(keys_file=path)
    assert error in str(caught.value)
    assert key not in str(caught.value)
    with pytest.raises(SystemExit):  # rotate says the same, with no traceback
        keys_main(["rotate", str(path)])
    stderr = capsys.readouterr().err
    assert error in stderr
    assert key not in stderr


def test_keys_come_from_a_file_or_from_variables_not_both(tmp_path: Path) -> None:
    fields = key_settings()
    # The two that go together, without the page-token keys, which may be left out.
    payload_keys, customer_id_key = fields["payload_keys"], fields["customer_id_key"]
    from_variables = KeySettings(payload_keys=payload_keys, customer_id_key=customer_id_key)
    assert from_variables.keys.payload_keys == KEYS.payload_keys
    assert from_variables.keys.encrypt_with == KEYS.encrypt_with
    path = keys_file(tmp_path)
    with pytest.raises(ValidationError, match="not both"):
        KeySettings(keys_file=path, payload_keys=payload_keys, customer_id_key=customer_id_key)
    with pytest.raises(ValidationError, match="go together"):
        KeySettings(payload_keys=payload_keys)
    assert not KeySettings().has_keys


@pytest.mark.parametrize("module", ["server", "worker"])
def test_a_process_refuses_to_start_without_keys(module: str) -> None:
    """Secure by default: never a process writing orders in plain text."""
    done = subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "no keys: give --keys-file or ORDER_KEYS_FILE" in done.stderr


# --- Key rotation ----------------------------------------------------------------------------


async def test_a_rotated_key_encrypts_new_payloads_and_the_old_one_still_decrypts(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    old = new_keys()
    rotated = old.rotated()
    async with open_stack(temporal.client, tmp_path, keys=old) as before:
        created = await before.stub.CreateOrder(create_request())
        pending = await order_reaching(before, created.order_id, S.ORDER_STATUS_PENDING)
        task_queue = before.task_queue
    assert key_ids(await raw_history(temporal, created.workflow_id)) == {old.encrypt_with}

    # Servers and workers restarted with the rotated keys file: the order goes on.
    async with open_stack(temporal.client, tmp_path, keys=rotated, task_queue=task_queue) as after:
        assert (await after.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))) == pending
        await after.stub.ConfirmPayment(payment_request(created.order_id))
        delivered = await order_reaching(after, created.order_id, S.ORDER_STATUS_DELIVERED)
        assert delivered.customer_email == pending.customer_email
        history = await raw_history(temporal, created.workflow_id)
        assert key_ids(history) == {old.encrypt_with, rotated.encrypt_with}
        last = history_payloads(history)[-1][1]
        assert codec.key_id_of(last) == rotated.encrypt_with

    # Dropping the old key loses every payload it sealed: the error names it, and no key.
    only_new = Keys(
        {rotated.encrypt_with: rotated.payload_keys[rotated.encrypt_with]},
        rotated.encrypt_with,
        rotated.customer_id_key,
    )
    started = history.events[0].workflow_execution_started_event_attributes
    [order_input] = started.input.payloads
    converter = with_codec(temporal.client, only_new).data_converter
    with pytest.raises(codec.UndecryptablePayload, match=old.encrypt_with) as caught:
        await converter.decode([order_input], [OrderInput])
    for key in (*old.payload_keys.values(), *rotated.payload_keys.values()):
        assert base64.b64encode(key).decode() not in str(caught.value)
        assert key.hex() not in str(caught.value)


def test_a_payload_altered_or_sealed_with_another_key_of_the_same_id_is_refused() -> None:
    sealer = codec.EncryptionCodec(KEYS)
    sealed = sealer.encrypt(Payload(metadata={"encoding": b"json/plain"}, data=b'{"a": 1}'))
    assert sealer.decrypt(sealed).data == b'{"a": 1}'
    altered = Payload()
    altered.CopyFrom(sealed)
    altered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(codec.UndecryptablePayload, match="does not decrypt"):
        sealer.decrypt(altered)
    # The key id is bound to the ciphertext: relabelling a payload does not get it opened.
    impostor = Keys({KEYS.encrypt_with: new_keys().customer_id_key}, KEYS.encrypt_with, b"k" * 32)
    with pytest.raises(codec.UndecryptablePayload, match="does not decrypt"):
        codec.EncryptionCodec(impostor).decrypt(sealed)
    truncated = Payload(metadata=sealed.metadata, data=sealed.data[:20])
    with pytest.raises(codec.UndecryptablePayload, match="truncated"):
        sealer.decrypt(truncated)
    # Two sealings of one payload differ: a fresh nonce each time.
    assert sealer.encrypt(sealed).data != sealer.encrypt(sealed).data


# --- Orders from before encryption ----------------------------------------------------------


async def test_an_order_started_before_encryption_runs_on_answers_and_completes(
    temporal: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Started by a server and worker without keys (as before issue 12), then carried on by
    ones with keys: its old payloads pass through the codec as they are."""
    task_queue = f"orders-before-encryption-{uuid.uuid4().hex[:8]}"
    old_server = await start_server(
        ServerSettings(
            host="127.0.0.1",
            port=0,
            temporal_address=temporal.client.service_client.config.target_host,
            task_queue=task_queue,
            **key_settings(),  # the customer-id key only is used: the client has no codec
        ),
        client=temporal.client,  # no codec: as every client was before
    )
    try:
        activities = OrderActivities(ProviderSettings.instant(tmp_path))
        async with (
            build_worker(temporal.client, task_queue, activities),
            grpc.aio.insecure_channel(f"127.0.0.1:{old_server.port}") as channel,
        ):
            stub = async_stub(channel)
            created = await stub.CreateOrder(create_request())
            await eventually(
                lambda: stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id)),
                lambda order: bool(order.inventory_info.reservation_id),
                what="the inventory reserved by the worker without keys",
            )
    finally:
        await old_server.stop(grace=1.0)
    before = await raw_history(temporal, created.workflow_id)
    assert key_ids(before) == set()
    assert EMAIL.encode() in raw_bytes(before)  # as it was: plain JSON

    async with open_stack(temporal.client, tmp_path, task_queue=task_queue) as stack:
        # Read from the old, plain memo; and a query, which the new worker answers by
        # replaying the plain history.
        order = await stack.stub.GetOrder(pb.GetOrderRequest(order_id=created.order_id))
        assert order.customer_email == EMAIL
        handle = stack.client.get_workflow_handle(created.workflow_id, result_type=OrderState)
        assert await handle.query(GET_ORDER_STATUS_QUERY) == OrderStatus.PENDING.value
        await stack.stub.ConfirmPayment(payment_request(created.order_id))
        delivered = await order_reaching(stack, created.order_id, S.ORDER_STATUS_DELIVERED)
        assert delivered.payment_info.transaction_id == "TXN-1"
        state = await handle.result()
        assert state.status == OrderStatus.DELIVERED
    after = await raw_history(temporal, created.workflow_id)
    # The payloads written since are sealed; the old ones stay as they were.
    assert key_ids(after) == {KEYS.encrypt_with}
    assert codec.is_encrypted(history_payloads(after)[-1][1])
