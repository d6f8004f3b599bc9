"""One send() per HTTP response: uvicorn's httptools protocol with coalesced writes.

uvicorn writes a response's status line and headers on `http.response.start` and its body on
`http.response.body`: two `transport.write` calls, hence two send() syscalls and two TCP segments
(asyncio and uvloop set TCP_NODELAY), and the client wakes twice, the first time for a response it
cannot finish reading. On a loopback or virtual NIC each send() also runs the receive side in the
sender's context, so the header write alone was a large share of a one-request-at-a-time
gateway's CPU (the profile: docs/results/).

`CoalescingTransport` holds a write for at most one event-loop step; the next write (the body,
sent in the same step by every route here) leaves together with it in one send(). A write that no
other follows (a 100-continue, a streamed chunk) leaves at the end of the step, so nothing waits
longer than the step that produced it. Order is kept: everything goes through the one buffer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps an asyncio transport; every attribute but write/writelines/close is the wrapped one's."""

    __slots__ = ("_transport", "_loop", "_held", "_handle")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None  # a write waiting for the one that follows it
        self._handle: asyncio.Handle | None = None  # the end-of-step flush of `_held`

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._held is None:
            self._held = bytes(data)
            if self._handle is None:
                self._handle = self._loop.call_soon(self._flush)
            return
        held, self._held = self._held, None
        self._transport.write(held + bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        self._handle = None
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()  # what was written before close() still leaves, as with a bare transport
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport` (uvicorn.Config(http=this))."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]
