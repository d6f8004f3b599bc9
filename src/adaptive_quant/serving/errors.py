"""The gateway's domain errors, and the one table that says how each is answered.

A refusal has one HTTP status; the table (`KINDS`) gives, per status, the /v1 body's `type`
and the gRPC code. `refusal(exc)` turns any exception into a `Refusal` (the status, the message,
Retry-After), and a `Refusal` renders itself for every front:

  front         body                                           extra
  /v1 (REST)    {"error": {"type": "<type>", "message": ...}}  HTTP headers (Retry-After, WWW-Authenticate)
  /v2 (REST)    {"error": "<message>"}   (what tritonclient reads)
  v2 gRPC       the message as the status details              the gRPC code, Retry-After as a trailer

Every path through the gateway answers its errors from here: FastAPI's exception handlers
(fronts/asgi.py), the fast routes (through the dataplane), the API-key middleware and the gRPC
servicer. The message is the same, word for word, on every front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import orjson

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; see the server log"
STARTING_MESSAGE = "the service is starting"
# how an HTTP caller sends the key (auth.py reads both), named in the 401's message
HTTP_KEY_HOW = "X-API-Key: <key> or Authorization: Bearer <key>"
GRPC_KEY_HOW = "metadata x-api-key: <key> or authorization: Bearer <key>"

Headers = list[tuple[bytes, bytes]]  # raw ASGI headers: lower-case name, value


class InputError(ValueError):
    """The caller's request is wrong; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PayloadTooLarge(InputError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


class ProtocolError(InputError):
    """A request the Open Inference Protocol refuses; 400 unless said otherwise."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, status=status)


class ModelNotFound(ProtocolError):
    """A v2 request names a model or version this gateway does not serve (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


class Unauthorized(Exception):
    """No key, or a wrong one, where the service needs an API key (401). `how`: how this
    transport carries the key (HTTP_KEY_HOW, GRPC_KEY_HOW)."""

    def __init__(self, reason: str, how: str = HTTP_KEY_HOW) -> None:
        self.message = f"this service needs an API key and the request carried {reason}; send it as {how}"
        super().__init__(self.message)


class ServiceUnavailable(RuntimeError):
    """No variant could answer (all failed, timed out, or are unhealthy): 503 + Retry-After
    (`retry_after_s`; None: a state, such as not ready, that says no time)."""

    def __init__(self, message: str, retry_after_s: int | None = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


# ------------------------------------------------------------------------------- the table


class Kind(NamedTuple):
    type: str  # the /v1 body's error type
    grpc_code: grpc.StatusCode
    outcome: str  # the aq_requests_total label of a classify request refused so


KINDS: dict[int, Kind] = {
    400: Kind("bad_request", grpc.StatusCode.INVALID_ARGUMENT, "client_error"),
    401: Kind("unauthorized", grpc.StatusCode.UNAUTHENTICATED, "client_error"),
    404: Kind("not_found", grpc.StatusCode.NOT_FOUND, "client_error"),
    405: Kind("method_not_allowed", grpc.StatusCode.UNIMPLEMENTED, "client_error"),
    413: Kind("payload_too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, "client_error"),
    # a valid-looking option this service cannot honour, or a bad value
    422: Kind("invalid_input", grpc.StatusCode.INVALID_ARGUMENT, "client_error"),
    500: Kind("error", grpc.StatusCode.INTERNAL, "error"),  # a bug of ours
    503: Kind("unavailable", grpc.StatusCode.UNAVAILABLE, "unavailable"),
}
OTHER = Kind("error", grpc.StatusCode.INTERNAL, "error")  # a status the table does not name
# every HTTP answer with this status carries these headers
WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="adaptive-quant"')
JSON = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request, ready to answer on any front."""

    status: int
    message: str
    retry_after_s: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()  # more HTTP headers (an HTTPException's own)

    @property
    def kind(self) -> Kind:
        return KINDS.get(self.status, OTHER)

    def v1_body(self) -> bytes:
        return orjson.dumps({"error": {"type": self.kind.type, "message": self.message}})

    def v2_body(self) -> bytes:
        return orjson.dumps({"error": self.message})

    def http_headers(self) -> Headers:
        """content-type, then Retry-After (503), WWW-Authenticate (401) and any of its own."""
        out = [JSON]
        if self.retry_after_s is not None:
            out.append((b"retry-after", str(self.retry_after_s).encode()))
        if self.status == 401:
            out.append(WWW_AUTHENTICATE)
        out.extend(self.headers)
        return out

    def http_answer(self, v2: bool) -> tuple[int, Headers, bytes]:
        """(status, headers, body) in the /v2 protocol's shape, or the /v1 one."""
        return self.status, self.http_headers(), self.v2_body() if v2 else self.v1_body()

    def grpc_trailers(self) -> tuple[tuple[str, str], ...]:
        return () if self.retry_after_s is None else (("retry-after", str(self.retry_after_s)),)


def refusal(exc: BaseException) -> Refusal:
    """The table's answer to `exc`. A bug (anything not named here) is logged with its traceback
    and answered 500 without details."""
    if isinstance(exc, InputError):
        return Refusal(exc.status, exc.message)
    if isinstance(exc, ServiceUnavailable):
        return Refusal(503, exc.message, exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        return Refusal(401, exc.message)
    log.error("internal error while serving a request", exc_info=exc)
    return Refusal(500, INTERNAL_MESSAGE)


def is_v2_path(path: str) -> bool:
    """Paths answered in the Open Inference Protocol's error shape."""
    return path.startswith("/v2")
