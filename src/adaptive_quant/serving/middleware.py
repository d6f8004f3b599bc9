"""The gateway's HTTP middlewares: plain ASGI classes that wrap every route, the fast ones
(POST /v1/classify, v2 infer) included: GatewayApp (fronts/asgi.py) puts `app.add_middleware`'s
stack in front of its fast-route dispatcher. Plain ASGI, not BaseHTTPMiddleware: no extra task,
no Request object, a few header comparisons per request.

  RequestIdMiddleware  X-Request-Id on every answer: the caller's when it is sane, else a new one
  ApiKeyMiddleware     401 before the body is read when the key is missing or wrong (auth.py)
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adaptive_quant.serving.auth import OPEN_PATHS, key_problem, presented_key
from adaptive_quant.serving.errors import HTTP_KEY_HOW, Unauthorized, is_v2_path, refusal
from adaptive_quant.serving.fronts.asgi import send_answer

log = logging.getLogger(__name__)

REQUEST_ID = b"x-request-id"
# what is echoed back as given: up to 128 visible characters of a conservative set (UUIDs,
# W3C trace ids, ULIDs, "svc-1234"); anything else is replaced, so nothing odd reaches logs
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


class RequestIdMiddleware:
    """X-Request-Id on every HTTP answer: the caller's own when it sends a sane one, else
    "<process prefix>-<counter in hex>" (short, unique within the process; the prefix is random
    per process, so workers do not collide). A few µs per request: a header scan, the id, one
    wrapped send."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._prefix = os.urandom(4).hex().encode() + b"-"  # 8 hex digits per process
        self._count = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                if SANE_REQUEST_ID.fullmatch(value):
                    rid = value
                break
        if rid is None:
            rid = self._prefix + b"%x" % next(self._count)
        header = (REQUEST_ID, rid)

        def send_with_id(message: Message) -> Awaitable[None]:
            # a plain function handing back send's awaitable: no coroutine of its own per message
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            return send(message)

        await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """Every path but OPEN_PATHS needs the key; a refusal is the error table's 401 in the
    path's own shape (the v2 protocol's under /v2), with WWW-Authenticate."""

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
        reason = key_problem(presented_key(scope["headers"]), self.key)
        if reason is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("401 for %s %s from %s: %s", scope["method"], scope["path"], client[0], reason)
        if self.on_reject is not None:
            self.on_reject()
        answer = refusal(Unauthorized(reason, HTTP_KEY_HOW)).http_answer(v2=is_v2_path(scope["path"]))
        await send_answer(send, answer)
