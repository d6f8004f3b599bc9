"""The closed loop: `concurrency` callers, each sending its next request when the last one is
answered, until a deadline or a request count. The one loop of the load tester, the throughput
bench and the fronts bench; what a request is (which client, which body) is the caller's `send`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from adaptive_quant.tools.loadtest.stats import RequestRecord

# request index i, its send time (perf_counter s) → its record; must not raise
Send = Callable[[int, float], Awaitable[RequestRecord]]


async def closed_loop(
    send: Send, concurrency: int, stop_at: float, max_requests: int | None = None
) -> list[RequestRecord]:
    """Records of every request sent before `stop_at` (perf_counter s), in completion order;
    request indices 0, 1, … are handed out in send order, at most `max_requests` of them."""
    records: list[RequestRecord] = []
    next_i = 0

    async def caller() -> None:
        nonlocal next_i
        while True:
            now = time.perf_counter()
            if now >= stop_at or (max_requests is not None and next_i >= max_requests):
                return
            i, next_i = next_i, next_i + 1
            records.append(await send(i, now))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return records
