"""Clients that do not read: disconnected once their unsent responses wait too long or add up.

grpc core has no send timeout: a response a client never takes (HTTP/2 window 0)
stays in the server's memory, with its call, until the connection closes, and
neither cancelling the handler's task nor grpc.aio's context can cancel the core
call. So the watchdog closes the connection itself: it finds the connection's
socket among the process's own (psutil) and shuts it down, after which core
cancels every call on it (docs/decisions/0022).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import psutil

logger = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Unsent:
    peer: str
    since: float
    size: int


def peer_address(peer: str) -> tuple[str, int] | None:
    """("127.0.0.1", 54321) from grpc's "ipv4:127.0.0.1:54321" or "ipv6:[::1]:54321"."""
    family, _, address = peer.partition(":")
    if family not in ("ipv4", "ipv6"):
        return None  # a unix socket: a local client, nothing to find by port
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    return _plain_ip(host.strip("[]")), int(port)


def _plain_ip(ip: str) -> str:
    """An IPv4 address mapped into IPv6 (::ffff:1.2.3.4), as grpc names it: 1.2.3.4."""
    return ip.removeprefix("::ffff:")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # Looked up once: find_library runs `ldconfig -p` in a subprocess on Linux.
    with contextlib.suppress(OSError):
        return ctypes.CDLL(ctypes.util.find_library("c"))
    return None


def _release_freed_memory() -> None:
    """Gives freed heap back to the OS (glibc); elsewhere nothing, the memory is reused."""
    with contextlib.suppress(AttributeError):
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def close_connection(peer: str, local_ports: Iterable[int]) -> bool:
    """Shuts down this process's socket to `peer` on one of `local_ports`; False if none."""
    address = peer_address(peer)
    if address is None:
        return False
    ports = set(local_ports)
    for conn in psutil.Process().net_connections(kind="tcp"):
        if not conn.raddr or conn.fd < 0 or conn.laddr.port not in ports:
            continue
        if (_plain_ip(conn.raddr.ip), conn.raddr.port) != address:
            continue
        # A duplicate of core's descriptor: shutdown(2) acts on the connection itself,
        # close() on the duplicate only, so core sees the end and cleans up as usual.
        with socket.socket(fileno=os.dup(conn.fd)) as sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True
    return False


class SlowReaders:
    """Tracks every response waiting to be sent; disconnects a client whose oldest waited
    longer than `write_timeout` seconds, or whose waiting responses exceed `max_unsent_bytes`."""

    def __init__(
        self,
        write_timeout: float,
        max_unsent_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        close: Callable[[str, Iterable[int]], bool] = close_connection,
    ) -> None:
        self._timeout = write_timeout
        self._max_bytes = max_unsent_bytes
        self._clock = clock
        self._close = close
        self._ports: tuple[int, ...] = ()
        # In the order they started waiting, so the oldest are first.
        self._unsent: dict[int, _Unsent] = {}
        # Per peer: how many responses wait, and their bytes.
        self._peers: dict[str, list[int]] = {}
        self._next = 0
        self._closing: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.disconnected = 0

    def start(self, ports: Iterable[int]) -> None:
        """Watches the connections to `ports`, the server's bound ports."""
        self._ports = tuple(ports)
        self._task = asyncio.create_task(self._run(), name="slow-readers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def waiting(self, peer: str, size: int) -> int:
        """Notes a response of `size` bytes waiting to be sent to `peer`; `sent` ends it."""
        self._next += 1
        self._unsent[self._next] = _Unsent(peer, self._clock(), size)
        counts = self._peers.setdefault(peer, [0, 0])
        counts[0] += 1
        counts[1] += size
        total = counts[1]
        if total > self._max_bytes and peer not in self._closing:
            self._disconnect(peer, f"{total} bytes of responses wait to be sent to it")
        return self._next

    def sent(self, ticket: int) -> None:
        unsent = self._unsent.pop(ticket, None)
        if unsent is None:
            return
        counts = self._peers[unsent.peer]
        counts[0] -= 1
        counts[1] -= unsent.size
        if counts[0] == 0:
            del self._peers[unsent.peer]
            self._closing.discard(unsent.peer)

    def watch_unary(self, context: _Context, size: int) -> None:
        """A unary response the handler returned: waiting until grpc has sent it."""
        ticket = self.waiting(context.peer(), size)
        # grpc-stubs types the callback as a class of its own; grpc calls it with the context.
        context.add_done_callback(lambda _: self.sent(ticket))  # type: ignore[arg-type]

    def check(self) -> None:
        """Disconnects the clients whose oldest unsent response waited too long."""
        cutoff = self._clock() - self._timeout
        stale = set()
        for unsent in self._unsent.values():
            if unsent.since > cutoff:
                break
            stale.add(unsent.peer)
        for peer in stale - self._closing:
            self._disconnect(peer, f"a response waited over {self._timeout:g} s to be sent")

    def _disconnect(self, peer: str, why: str) -> None:
        self._closing.add(peer)
        closed = self._close(peer, self._ports)
        if closed:
            self.disconnected += 1
            logger.warning("Disconnected %s, a client that does not read: %s", peer, why)
        else:
            logger.warning("Cannot disconnect %s (%s): its socket was not found", peer, why)

    async def _run(self) -> None:
        interval = min(1.0, self._timeout / 4)
        released = self.disconnected
        while True:
            await asyncio.sleep(interval)
            self.check()
            if self.disconnected != released and not self._unsent:
                # What the disconnected clients held is free: return it to the OS.
                released = self.disconnected
                _release_freed_memory()


class TimedWrites:
    """A servicer context whose `write` the watchdog times (handlers that call write)."""

    def __init__(self, context: _Context, readers: SlowReaders) -> None:
        self._context = context
        self._readers = readers
        self._peer = context.peer()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def write(self, message: Any) -> None:
        ticket = self._readers.waiting(self._peer, message_size(message))
        try:
            await self._context.write(message)
        finally:
            self._readers.sent(ticket)


def message_size(message: Any) -> int:
    """A protobuf message's encoded size; 0 for anything else."""
    size = getattr(message, "ByteSize", None)
    return int(size()) if callable(size) else 0
