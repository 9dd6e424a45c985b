"""An in-memory stand-in for temporalio.client.Client, and the settings of a server in front
of it: the servicer's own logic over real gRPC in milliseconds (tests/test_server_servicer.py,
tests/test_reflection.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import temporalio.api.workflowservice.v1 as workflowservice
from temporalio.converter import DataConverter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from server.platform.settings import ServerSettings
from tests.support.keys import key_settings
from workflows import models, search_attributes

# When every order the stand-in starts was created and last updated.
NOW = datetime(2025, 1, 31, 14, 30, 22, tzinfo=UTC)
# A server in front of the stand-in: `start_server(CONFIG, client=cast(Client, FakeTemporal()))`.
CONFIG = ServerSettings(
    host="127.0.0.1",
    port=0,
    task_queue="orders-unit",
    payment_timeout=timedelta(seconds=600),
    temporal_rpc_timeout=timedelta(seconds=2),
    **key_settings(),
)


@dataclass
class FakeWorkflow:
    state: models.OrderState
    signals: list[tuple[str, object]] = field(default_factory=list)
    closed: bool = False


class FakeHandle:
    def __init__(self, temporal: FakeTemporal, workflow_id: str) -> None:
        self._temporal = temporal
        self._workflow_id = workflow_id

    async def signal(
        self, signal: str, arg: object, *, rpc_timeout: timedelta | None = None
    ) -> None:
        workflow = await self._temporal.call("signal", rpc_timeout, self._workflow_id)
        if workflow.closed:
            raise RPCError("workflow execution already completed", RPCStatusCode.NOT_FOUND, b"")
        workflow.signals.append((signal, arg))


class FakeTemporal:
    """Just the calls the server makes, with failures to order."""

    def __init__(self) -> None:
        self.workflows: dict[str, FakeWorkflow] = {}
        self.starts: list[dict[str, object]] = []
        self.rpc_timeouts: list[timedelta | None] = []
        self.failure: BaseException | None = None
        self.hang = False
        self.healthy = True
        self.namespace = "default"
        self.poller_seen_ago: timedelta | None = None  # None: no worker has polled

    @property
    def workflow_service(self) -> FakeTemporal:
        return self

    @property
    def data_converter(self) -> DataConverter:
        return DataConverter.default

    async def describe_workflow_execution(
        self,
        request: workflowservice.DescribeWorkflowExecutionRequest,
        **kwargs: object,
    ) -> workflowservice.DescribeWorkflowExecutionResponse:
        """The state the workflow keeps in its memo (docs/decisions/0016)."""
        rpc_timeout = cast(timedelta | None, kwargs.get("timeout"))
        workflow = await self.call("describe", rpc_timeout, request.execution.workflow_id)
        [state] = await DataConverter.default.encode([workflow.state])
        response = workflowservice.DescribeWorkflowExecutionResponse()
        response.workflow_execution_info.memo.fields[search_attributes.MEMO_ORDER_STATE].CopyFrom(
            state
        )
        return response

    async def get_system_info(self, request: object, **kwargs: object) -> object:
        if not self.healthy:
            raise RPCError("tcp connect error", RPCStatusCode.UNAVAILABLE, b"")
        return object()

    async def describe_task_queue(
        self, request: workflowservice.DescribeTaskQueueRequest, **kwargs: object
    ) -> workflowservice.DescribeTaskQueueResponse:
        assert request.task_queue.name == CONFIG.task_queue
        response = workflowservice.DescribeTaskQueueResponse()
        if self.poller_seen_ago is not None:
            response.pollers.add().last_access_time.FromDatetime(
                datetime.now(UTC) - self.poller_seen_ago
            )
        return response

    async def call(
        self, kind: str, rpc_timeout: timedelta | None, workflow_id: str
    ) -> FakeWorkflow:
        self.rpc_timeouts.append(rpc_timeout)
        if self.hang:
            await asyncio.sleep(3600)
        if self.failure is not None:
            raise self.failure
        if workflow_id not in self.workflows:
            raise RPCError(
                f"workflow not found for ID: {workflow_id}", RPCStatusCode.NOT_FOUND, b""
            )
        return self.workflows[workflow_id]

    def get_workflow_handle(self, workflow_id: str) -> FakeHandle:
        return FakeHandle(self, workflow_id)

    async def start_workflow(self, workflow: str, arg: models.OrderInput, **kwargs: object) -> None:
        self.rpc_timeouts.append(cast(timedelta, kwargs["rpc_timeout"]))
        if self.failure is not None:
            raise self.failure
        self.starts.append({"workflow": workflow, "arg": arg, **kwargs})
        workflow_id = str(kwargs["id"])
        if workflow_id in self.workflows:
            raise WorkflowAlreadyStartedError(workflow_id, workflow)
        self.workflows[workflow_id] = FakeWorkflow(
            models.OrderState(
                order_id=arg.order_id,
                customer_id=arg.customer_id,
                customer_email=arg.customer_email,
                items=arg.items,
                shipping=arg.shipping,
                status=models.OrderStatus.PENDING,
                total_amount=models.order_total(arg.items),
                created_at=NOW,
                updated_at=NOW,
                request_fingerprint=arg.request_fingerprint,
            )
        )

    def order(self, order_id: str) -> FakeWorkflow:
        return self.workflows[models.workflow_id_for(order_id)]
