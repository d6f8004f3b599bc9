"""Optional API key: every path but the probes and /metrics needs `X-API-Key: <key>`
(or `Authorization: Bearer <key>`); a missing or wrong key gets 401 before the body is read.

A plain ASGI middleware rather than a FastAPI dependency, so that it also guards /docs and
/openapi.json and costs one header lookup per request (no extra task or threadpool hop).
The probes stay open because orchestrators call them without secrets; /metrics stays open for
Prometheus scrapers (bind the gateway to loopback or a private network if that matters).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

# the probes of both fronts (REST and the v2 protocol) and the scrape endpoint
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
KEY_HEADER = b"x-api-key"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: X-API-Key, else an Authorization Bearer token, else None."""
    bearer = None
    for name, value in headers:
        if name == KEY_HEADER:
            return value.strip()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
    return bearer


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[], None] | None = None) -> None:
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty key")
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject  # e.g. a metrics counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        # compare_digest: the time taken does not reveal how much of a wrong key was right
        if key is not None and hmac.compare_digest(key, self.key):
            await self.app(scope, receive, send)
            return
        reason = "no API key" if key is None else "a wrong API key"
        client = scope.get("client") or ("?", 0)
        log.warning("401 for %s %s from %s: %s", scope["method"], scope["path"], client[0], reason)
        if self.on_reject is not None:
            self.on_reject()
        message = (
            f"this service needs an API key and the request carried {reason}; "
            "send it as X-API-Key: <key> or Authorization: Bearer <key>"
        )
        # each front's own error shape: the v2 protocol's is {"error": "<message>"}
        shape = message if scope["path"].startswith("/v2") else {"type": "unauthorized", "message": message}
        body = json.dumps({"error": shape}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="adaptive-quant"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
