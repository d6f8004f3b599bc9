"""Run the gateway app under uvicorn, with a graceful drain on SIGTERM/SIGINT.

On the signal uvicorn stops accepting connections, closes idle keep-alive ones, and lets the
requests in flight finish (up to `server.drain_timeout_s`, then cancels them) before the app's
lifespan closes the backend. This module adds the logs an operator needs to see that happen.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from adaptive_quant.core.net import is_loopback
from adaptive_quant.serving.settings import ServeSettings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.on_started: Callable[[], None] | None = None  # called once serving (workers.py: "ready")

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:  # not after a failed lifespan start-up
            self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = getattr(self.app.state, "service", None)
        in_flight = service.in_flight if service is not None else 0
        log.info(
            "shutting down: no new connections; draining %d in-flight classify request(s), at most %.0f s",
            in_flight,
            self.config.timeout_graceful_shutdown or 0,
        )
        metrics = self.app.state.metrics
        cancelled_before = metrics.value("aq_requests_total", outcome="cancelled")
        t = time.perf_counter()
        grpc_front = getattr(self.app.state, "grpc", None)
        # the gRPC front drains alongside HTTP (same timeout), not after it: the lifespan's own
        # stop, once uvicorn is done, then finds it stopped
        stopping = (
            None
            if grpc_front is None
            else asyncio.ensure_future(grpc_front.stop(self.config.timeout_graceful_shutdown or 0))
        )
        await super().shutdown(sockets)
        if stopping is not None:
            await stopping
        left = int(metrics.value("aq_requests_total", outcome="cancelled") - cancelled_before)
        if left:
            log.error(
                "drain ended after %.2f s with %d request(s) cut by the drain timeout", time.perf_counter() - t, left
            )
        else:
            log.info("drained in %.2f s; every request in flight was answered", time.perf_counter() - t)


def make_server(app: FastAPI, settings: ServeSettings) -> DrainingServer:
    s = settings.server
    if not is_loopback(s.host) and not s.api_key:
        log.warning(
            "listening on %s without an API key: anyone who can reach this address can call "
            "the service (set server.api_key_file or AQ_SERVER__API_KEY)",
            s.host,
        )
    config = uvicorn.Config(
        app,
        http=_http_protocol(s.coalesce_writes),
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        access_log=s.access_log,
        timeout_keep_alive=s.keep_alive_s,  # type: ignore[arg-type]  # float s is fine
        timeout_graceful_shutdown=s.drain_timeout_s,
    )  # type: ignore[arg-type]  # float s is fine
    return DrainingServer(config, app)


def _http_protocol(coalesce: bool) -> Any:
    """uvicorn's `http` choice: its httptools protocol with one send() per response, or "auto"."""
    if not coalesce:
        return "auto"
    try:
        from adaptive_quant.serving.transport import CoalescingHttpToolsProtocol
    except ImportError:  # uvicorn without httptools: its h11 protocol, as before
        log.info("httptools is not installed: serving on uvicorn's h11 protocol without write coalescing")
        return "auto"
    return CoalescingHttpToolsProtocol


def run(app: FastAPI, settings: ServeSettings) -> None:
    """Serve until SIGTERM/SIGINT, then drain (blocks)."""
    make_server(app, settings).run()
