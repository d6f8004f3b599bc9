"""The optional API key: what counts as presenting it, and which calls need none. One rule for
both transports: the HTTP middleware (middleware.py) and the gRPC servicer (fronts/v2_grpc.py).

Every path but the probes and /metrics needs `X-API-Key: <key>` (or `Authorization: Bearer <key>`;
over gRPC the same names as metadata). The probes stay open because orchestrators call them
without secrets; /metrics stays open for Prometheus scrapers (bind the gateway to loopback or a
private network if that matters).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

# the probes of both HTTP fronts (REST and the v2 protocol) and the scrape endpoint
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
KEY_HEADER = b"x-api-key"


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: X-API-Key, else an Authorization Bearer token, else None."""
    bearer = None
    for name, value in headers:
        if name == KEY_HEADER:
            return value.strip()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
    return bearer


def key_problem(presented: bytes | None, key: bytes) -> str | None:
    """None when `presented` is the key, else what was wrong ("no API key", "a wrong API key").
    compare_digest: the time taken does not reveal how much of a wrong key was right."""
    if presented is not None and hmac.compare_digest(presented, key):
        return None
    return "no API key" if presented is None else "a wrong API key"
