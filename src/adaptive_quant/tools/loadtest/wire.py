"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load tester only.

Why not httpx: on a small machine shared with the gateway, httpx.AsyncClient's own bookkeeping
took more CPU than the gateway it measured, so the tool measured itself (docs/results/). This
client writes pre-built bytes and parses a status line, headers and a Content-Length (or
chunked) body, far less CPU per request, so the figures are the gateway's.

It speaks only what the gateway answers: HTTP/1.1, Content-Length or chunked bodies, keep-alive
unless the server says `Connection: close`. Not a general-purpose client.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 65536


class WireError(ConnectionError):
    """The connection failed or the answer was not HTTP/1.1 we can read."""


class _StaleConnection(WireError):
    """The server closed the connection before answering (an idle keep-alive connection it had
    timed out): the request was not processed, so it is sent again on a new connection."""


@dataclass
class WireResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class WirePool:
    """Up to `size` keep-alive connections to one host; `await request(...)` → WireResponse.

    Raises TimeoutError after `timeout_s` for the whole exchange, WireError on a broken
    connection or an unreadable answer (the connection is then dropped, never reused)."""

    def __init__(self, url: str, size: int, timeout_s: float, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port URLs are supported, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Conn] = []
        host_header = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        fixed = {"Host": host_header, **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())

    def build(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        """The request's bytes (build once, send many times)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}{extra}Content-Length: {len(body)}\r\n\r\n"
        return head.encode("latin-1") + body

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> WireResponse:
        return await self.send(self.build(method, path, body, headers))

    async def send(self, raw: bytes) -> WireResponse:
        async with self._slots:
            while self._idle:
                conn = self._idle.pop()
                try:
                    return await self._send_on(conn, raw)
                except _StaleConnection:  # the server closed it while idle (keep-alive timeout)
                    continue
            conn = await asyncio.wait_for(self._connect(), self.timeout_s)
            try:
                return await self._send_on(conn, raw)
            except _StaleConnection as exc:  # a fresh connection closed at once: really broken
                raise WireError(f"connection closed before any answer: {exc.__cause__!r}") from None

    async def _send_on(self, conn: _Conn, raw: bytes) -> WireResponse:
        try:
            resp, keep = await asyncio.wait_for(self._exchange(conn, raw), self.timeout_s)
        except BaseException:  # timeout, cancel or a broken connection: never reuse it
            conn.close()
            raise
        if keep:
            self._idle.append(conn)
        else:
            conn.close()
        return resp

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise WireError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, raw: bytes) -> tuple[WireResponse, bool]:
        try:
            conn.writer.write(raw)
            await conn.writer.drain()
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise WireError("response headers too large") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:  # closed before a byte of the answer: safe to send again elsewhere
                raise _StaleConnection() from exc
            raise WireError(f"connection broken: {exc!r}") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:  # the server's keep-alive close raced our send
            raise _StaleConnection() from exc
        except OSError as exc:
            raise WireError(f"connection broken: {exc!r}") from exc
        if len(head) > MAX_HEADER_BYTES:
            raise WireError("response headers too large")
        lines = head.decode("latin-1").split("\r\n")
        try:
            version, code, *_ = lines[0].split(" ", 2)
            status = int(code)
        except ValueError:
            raise WireError(f"not an HTTP status line: {lines[0][:80]!r}") from None
        if not version.startswith("HTTP/1."):
            raise WireError(f"not HTTP/1.x: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        try:
            if "content-length" in headers:
                body = await conn.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._chunked(conn.reader)
            else:  # body until close
                body = await conn.reader.read()
                headers["connection"] = "close"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise WireError(f"connection broken while reading the body: {exc!r}") from exc
        keep = headers.get("connection", "").lower() != "close"
        return WireResponse(status, headers, body), keep

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from the gateway
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def __aenter__(self) -> WirePool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
