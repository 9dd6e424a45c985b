"""A TCP proxy on loopback: in front of Temporal, late, terminating TLS, or cut off.

    async with Proxy("127.0.0.1:7233") as proxy:        # on a free port: proxy.address
        ...
        proxy.partition()                               # from now on, nothing gets through

`tls` terminates TLS (the target speaks plain text); `after` starts listening
only that many seconds later, on `port` (a server that comes up late).
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext, SSLError
from types import TracebackType


class Proxy:
    """Forwards 127.0.0.1:`port` (free unless told) to `target`; `partition()` holds every byte.

    Partitioned, it keeps running but forwards nothing (connections stay open, new
    ones are accepted), so a worker behind it can finish an effect while Temporal
    never hears of it: the "reply lost" case, made deterministic.
    """

    def __init__(
        self, target: str, *, port: int = 0, tls: SSLContext | None = None, after: float = 0.0
    ) -> None:
        self.target = target
        self.port = port
        self.tls = tls
        self.after = after
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._healed = asyncio.Event()
        self._healed.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        await asyncio.sleep(self.after)
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, ssl=self.tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        self._healed.clear()

    async def close(self) -> None:
        if self._starting is not None:
            await self._starting
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Proxy:
        """Starts it; with `after`, in the background (the port must be given then)."""
        self._starting = asyncio.create_task(self.start())
        if not self.after:
            await self._starting
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._healed.wait()  # partitioned: hold everything, forever
                writer.write(data)
                await writer.drain()
        except (ConnectionError, SSLError, asyncio.CancelledError):
            pass
        finally:
            if self._healed.is_set():
                writer.close()
