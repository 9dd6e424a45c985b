"""A gRPC proxy on loopback in front of Temporal's frontend that counts the calls through it.

    async with CountingProxy(temporal_address) as proxy:   # on a free port: proxy.address
        client = await Client.connect(proxy.address)
        proxy.reset()
        await client.get_workflow_handle("some-id").describe()
        assert proxy.counts() == {DESCRIBE: 1}

Every call is unary on Temporal's WorkflowService and OperatorService, so the
proxy forwards unary calls only: the request and the answer as raw bytes (grpc
undoes the client's gzip), the caller's metadata and deadline, and on error the
status code, its message and its trailing metadata (Temporal's error details).
A call is counted as it arrives, before it is forwarded.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import cast

import grpc

_SERVICE = "/temporal.api.workflowservice.v1.WorkflowService/"
START = _SERVICE + "StartWorkflowExecution"
DESCRIBE = _SERVICE + "DescribeWorkflowExecution"
SIGNAL = _SERVICE + "SignalWorkflowExecution"
QUERY = _SERVICE + "QueryWorkflow"
UPDATE = _SERVICE + "UpdateWorkflowExecution"
HISTORY = _SERVICE + "GetWorkflowExecutionHistory"
LIST = _SERVICE + "ListWorkflowExecutions"
COUNT = _SERVICE + "CountWorkflowExecutions"
# What the server's health prober calls every 2 s (server/platform/health.py).
SYSTEM_INFO = _SERVICE + "GetSystemInfo"
DESCRIBE_TASK_QUEUE = _SERVICE + "DescribeTaskQueue"

_Metadata = tuple[tuple[str, str | bytes], ...]
# Metadata grpc sets itself on the forwarded call; passing it on would be refused.
_TRANSPORT_KEYS = ("user-agent", "te", "content-type")
# Temporal's answers can be large (a long history page); grpc's default is 4 MiB.
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def _passable(key: str) -> bool:
    return not key.startswith((":", "grpc-")) and key not in _TRANSPORT_KEYS


class CountingProxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Forwards 127.0.0.1:`port` (free unless told) to `target`, counting calls per method."""

    def __init__(self, target: str, *, port: int = 0) -> None:
        self.target = target
        self.port = port
        self._counts: Counter[str] = Counter()
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def counts(self) -> Counter[str]:
        """Calls per full method name (`/package.Service/Method`) since the last reset."""
        return Counter(self._counts)

    def reset(self) -> None:
        self._counts.clear()

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=_OPTIONS)
        self._server = grpc.aio.server(options=_OPTIONS)
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def close(self) -> None:
        """Stops at once: calls still running (long polls) end CANCELLED."""
        if self._server is not None:
            await self._server.stop(None)
        if self._channel is not None:
            await self._channel.close(None)

    async def __aenter__(self) -> CountingProxy:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = handler_call_details.method

        async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            self._counts[method] += 1
            assert self._channel is not None, "not started"
            metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if _passable(k))
            call = self._channel.unary_unary(method, None, None)(
                request, metadata=metadata, timeout=context.time_remaining()
            )
            try:
                answer: bytes = await call
            except grpc.aio.AioRpcError as error:
                # The stubs type it as objects; grpc gives (key, value) tuples.
                trailing = cast(_Metadata, tuple(error.trailing_metadata() or ()))
                await context.abort(error.code(), error.details() or "", trailing)
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)
