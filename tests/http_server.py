"""A real HTTP server for tests: an ASGI app under uvicorn in a thread, on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from adaptive_quant.serving.transport import CoalescingHttpToolsProtocol


@contextmanager
def serve_in_thread(app, start_timeout_s: float = 30.0, coalesce: bool = True) -> Iterator[str]:
    """Run `app` on 127.0.0.1 (a free port) until the block ends; yields its base URL.

    `coalesce`: uvicorn's protocol as the gateway runs it (serving/transport.py: one send() per
    response), or uvicorn's own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = CoalescingHttpToolsProtocol if coalesce else "auto"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
