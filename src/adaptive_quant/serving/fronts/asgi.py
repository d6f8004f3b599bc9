"""What the HTTP fronts share: one path per request through the app, raw ASGI for the busy routes.

  uvicorn → GatewayApp → [app.add_middleware's stack: request id, API key, ...]
                          → FastRoutes ─ POST /v1/classify, POST /v2/.../infer → their handler (raw ASGI)
                                      └ every other request → FastAPI's stack (error middleware,
                                        exception handlers, router) → its route

The busy routes are raw ASGI (orjson, no pydantic, no Request object) because FastAPI's layers
around an endpoint (routing, dependency solving, telemetry, body-limit, exception and exit-stack
middlewares) cost about a fifth of a busy gateway's event loop, per request, before a line of
ours ran (the profile: docs/results/). Each is declared once, as a `FastRoute`: an APIRoute
whose ASGI app is the handler itself, so the OpenAPI document describes it from that
declaration like any other route, and FastAPI's router, should it ever receive the request,
runs the same handler. Middleware added with `app.add_middleware` sits in front of the
dispatcher, so it wraps every route, the busy ones included.

Errors: FastAPI's exception handlers (`install_error_handlers`, registered once) and the fast
routes (through the dataplane) both answer from the one table in errors.py, in the v2 protocol's
shape under /v2 and the /v1 shape elsewhere.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette._utils import get_route_path  # the path as Starlette's router matches it (root_path off)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from adaptive_quant.serving.errors import (
    STARTING_MESSAGE,
    Headers,
    InputError,
    PayloadTooLarge,
    Refusal,
    ServiceUnavailable,
    Unauthorized,
    is_v2_path,
    refusal,
)

Answer = tuple[int, Headers, bytes]  # status, headers, body
ReadBody = Callable[[int], Awaitable[bytes]]  # limit (bytes) → the body; PayloadTooLarge beyond it
JSON = (b"content-type", b"application/json")
STARTING = Refusal(503, STARTING_MESSAGE, retry_after_s=1)  # the lifespan has not finished starting
# FastAPI's native OpenTelemetry asks the OTel API for three providers on every request (several
# µs, even with none configured); off here (nothing uses it): to trace, add OTel's ASGI
# middleware with add_middleware, which then wraps every route, the fast ones included
NO_NATIVE_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}


async def send_answer(send: Send, answer: Answer) -> None:
    """One HTTP answer: the status and headers (Content-Length added), then the body."""
    status, headers, body = answer
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the last of a repeated one)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def body_reader(scope: Scope, receive: Receive) -> ReadBody:
    """The body from ASGI messages, refusing more than `limit` bytes without reading it all."""

    async def read(limit: int) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    raise PayloadTooLarge(f"request body is {int(value)} bytes; at most {limit} are accepted")
                break
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client went away; nobody reads the answer
                raise InputError("the client disconnected before sending the whole body", status=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked upload without Content-Length
                raise PayloadTooLarge(f"request body exceeds {limit} bytes, the most accepted")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    return read


def answer_headers(precision: str, budget_met: bool, started: float, version: int) -> Headers:
    """X-Precision, X-Budget-Met, X-Server-Time-Ms (ms since `started`, encoding the answer
    included) and X-Model-Version (the model version that answered): every HTTP front's answer
    carries them."""
    server_ms = (time.perf_counter() - started) * 1e3
    return [
        (b"x-precision", precision.encode()),
        (b"x-budget-met", b"true" if budget_met else b"false"),
        (b"x-server-time-ms", f"{server_ms:.3f}".encode()),
        (b"x-model-version", str(version).encode()),
    ]


# ------------------------------------------------------------------------------- the fast routes


def _declared_endpoint(path: str) -> Callable[..., Awaitable[None]]:
    """A stand-in endpoint whose signature names the path's parameters (strings), from which
    FastAPI documents them; it is never called: the route's ASGI app is its handler."""

    async def endpoint(**_: str) -> None:
        raise RuntimeError("a FastRoute is answered by its handler")

    params = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=str) for n in re.findall(r"{(\w+)}", path)
    ]
    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return endpoint


class FastRoute(APIRoute):
    """A route answered by `handler`, a raw ASGI app, ahead of FastAPI's stack (FastRoutes),
    declared with APIRoute's arguments (name, response_model, responses, openapi_extra, ...)."""

    def __init__(self, path: str, handler: ASGIApp, *, method: str = "POST", **declaration: Any) -> None:
        super().__init__(path, _declared_endpoint(path), methods=[method], **declaration)
        self.method = method
        self.handler = handler
        self.app = handler  # the router, should it receive this route's request, runs the same handler


class FastRoutes:
    """ASGI: a fast route's request to its handler (path parameters in scope["path_params"],
    as Starlette's router puts them), everything else to `app`."""

    def __init__(self, app: ASGIApp, routes: Iterable[FastRoute]) -> None:
        self.app = app
        self.exact: dict[str, FastRoute] = {}  # path → route, for paths without parameters
        self.patterned: list[FastRoute] = []
        for route in routes:
            if route.param_convertors:
                self.patterned.append(route)
            else:
                self.exact[route.path] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = get_route_path(scope)
            method = scope["method"]
            route = self.exact.get(path)
            if route is not None:
                if method == route.method:
                    await route.handler(scope, receive, send)
                    return
            else:
                for route in self.patterned:
                    if method == route.method and (match := route.path_regex.match(path)):
                        scope["path_params"] = match.groupdict()
                        await route.handler(scope, receive, send)
                        return
        await self.app(scope, receive, send)


class GatewayApp(FastAPI):
    """FastAPI, with the stack [add_middleware's] → FastRoutes → [FastAPI's own] → router."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(telemetry=NO_NATIVE_TELEMETRY, **kwargs)  # type: ignore[arg-type]

    def build_middleware_stack(self) -> ASGIApp:
        user, self.user_middleware = self.user_middleware, []
        try:
            app = super().build_middleware_stack()  # ServerErrorMiddleware → ... → ExceptionMiddleware → router
        finally:
            self.user_middleware = user
        app = FastRoutes(app, [r for r in self.router.routes if isinstance(r, FastRoute)])
        for cls, args, kwargs in reversed(user):
            app = cls(app, *args, **kwargs)
        return app

    def add_fast_route(self, route: FastRoute) -> None:
        """Add `route` directly to the app's router (not through an APIRouter, which would copy
        it into a plain APIRoute); the dispatcher is built from these on the first request."""
        self.router.routes.append(route)


# ------------------------------------------------------------------------------- errors


def http_refusal(exc: Exception) -> Refusal:
    """The error table's answer to an exception raised in FastAPI's stack: the framework's own
    (unknown path 404, wrong method 405, a parameter FastAPI validated 422) and the domain's."""
    if isinstance(exc, StarletteHTTPException):
        own = tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items())
        return Refusal(exc.status_code, str(exc.detail), headers=own)
    if isinstance(exc, RequestValidationError):
        parts = ["/".join(str(p) for p in e.get("loc", ())) + ": " + e.get("msg", "") for e in exc.errors()]
        return Refusal(422, "; ".join(parts) or "invalid request")
    return refusal(exc)


async def answer_error(request: Request, exc: Exception) -> Response:
    status, headers, body = http_refusal(exc).http_answer(v2=is_v2_path(get_route_path(request.scope)))
    response = Response(body, status_code=status)  # with Content-Length
    response.raw_headers.extend(headers)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """One handler for every exception FastAPI's stack can raise; a bug (Exception) is answered
    500 by Starlette's ServerErrorMiddleware through it, then re-raised for the server's log."""
    for exc_class in (
        InputError,
        ServiceUnavailable,
        Unauthorized,
        RequestValidationError,
        StarletteHTTPException,
        Exception,
    ):
        app.add_exception_handler(exc_class, answer_error)  # type: ignore[arg-type]
