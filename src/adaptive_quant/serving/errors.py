"""Domain errors of the gateway; app.py maps each to one HTTP answer, in one place."""

from __future__ import annotations

ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_input",
    503: "unavailable",
}


def error_body(status: int, message: str) -> dict:
    """The one error shape every route answers with: {"error": {"type", "message"}}."""
    return {"error": {"type": ERROR_TYPES.get(status, "error"), "message": message}}


class InputError(ValueError):
    """The caller's request is wrong; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PayloadTooLarge(InputError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


class ServiceUnavailable(RuntimeError):
    """No variant could answer (all failed, timed out, or are unhealthy): 503 + Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
