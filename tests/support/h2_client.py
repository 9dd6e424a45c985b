"""A raw HTTP/2 gRPC client that never reads: its flow-control window is 0 and never opens.

It sends unary calls and takes the response headers, which HTTP/2 does not flow
control, but no response message can ever reach it: the server must hold them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from google.protobuf.message import Message


@dataclass
class StalledClient:
    """One connection to `host`:`port` with an initial window of 0."""

    host: str
    port: int
    responses: int = 0  # response headers received
    resets: int = 0  # streams the server reset
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _conn: h2.connection.H2Connection | None = None
    _writer: asyncio.StreamWriter | None = None
    _reader_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_connection(self.host, self.port)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config)
        self._conn.initiate_connection()
        self._conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        await self._flush()
        self._reader_task = asyncio.create_task(self._read(reader))

    async def call(self, method: str, request: Message, metadata: dict[str, str]) -> None:
        """Sends one unary call: `method` is "/package.Service/Method"."""
        assert self._conn is not None
        body = request.SerializeToString()
        stream_id = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata.items(),
        ]
        self._conn.send_headers(stream_id, headers)
        self._conn.send_data(
            stream_id, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True
        )
        await self._flush()

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _flush(self) -> None:
        assert self._conn is not None
        assert self._writer is not None
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        assert self._conn is not None
        try:
            while data := await reader.read(65536):
                for event in self._conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        self.responses += 1
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.closed.set()
                # Acknowledges settings and pings, as a live client does; never a WINDOW_UPDATE.
                await self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
