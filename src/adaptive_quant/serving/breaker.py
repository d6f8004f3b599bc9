"""Per-variant circuit breakers: a variant that fails `breaker.failures` calls in a row is left
out of routing for `breaker.cooldown_s`, then tried again.

Only errors count, not timeouts: a timeout under overload says "busy", which the latency
estimate already learns from; tripping the breaker on it would take the busiest variant out and
pile its load on the others (it turned overload into 503s at high concurrency).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from adaptive_quant.serving.settings import BreakerSettings

log = logging.getLogger(__name__)


@dataclass
class Breaker:
    """Consecutive failures of one variant; open = left out of routing until `open_until`."""

    failures: int = 0
    open_until: float = 0.0  # time.monotonic() s
    total_failures: int = 0  # since start-up, for /v1/status


class Breakers:
    """The breakers of one served model's variants, in its column order."""

    def __init__(self, keys: Sequence[str], config: BreakerSettings) -> None:
        self.config = config
        self._by_key = {k: Breaker() for k in keys}
        self.columns = list(self._by_key.values())  # (V,) in `keys` order

    def __getitem__(self, key: str) -> Breaker:
        return self._by_key[key]

    def record_success(self, key: str) -> None:
        self._by_key[key].failures = 0

    def record_failure(self, key: str) -> None:
        b = self._by_key[key]
        b.failures += 1
        b.total_failures += 1
        if b.failures >= self.config.failures:
            b.open_until = time.monotonic() + self.config.cooldown_s
            log.warning(
                "variant %s failed %d times in a row; out of routing for %.1f s",
                key,
                b.failures,
                self.config.cooldown_s,
            )

    def retry_after_s(self) -> int:
        """Seconds until a variant is likely back: the shortest open breaker's cooldown, at least 1."""
        now = time.monotonic()
        waits = [b.open_until - now for b in self.columns if b.open_until > now]
        return max(1, math.ceil(min(waits))) if waits else 1
