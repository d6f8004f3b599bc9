"""The abstract engine the gateway talks to (vLLM style: the HTTP layer knows only this)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class BackendError(RuntimeError):
    """A backend call failed (the gateway falls back to another variant)."""


class VariantUnavailable(BackendError):
    """The variant is not loaded or was found unhealthy at start-up."""


@dataclass(frozen=True)
class VariantHealth:
    key: str  # manifest variant key, e.g. "int8"
    healthy: bool
    detail: str  # "ok", or why not (missing file, corrupt ONNX, model not ready on Triton, ...)


class Backend(ABC):
    """Serves one model version's variants (its manifest).

    Lifecycle: `await start()` → infer* → [`await retire()`] → `await close()`. `retire()` is
    called once the version is no longer live (dropped from versions.json's serving/canary) and
    nothing is in flight on it here, before `close()`; a backend whose server holds the version
    (Triton) lets it go there, the others have nothing to do.
    """

    name: str = "abstract"

    def set_contention_probe(self, probe: Callable[[], bool]) -> None:  # noqa: B027 - optional hook
        """`probe()` says whether other requests are in the gateway now; a backend that can
        compute on the caller's thread does so only when it says no (embedded). Default: unused."""

    def set_replica_listener(self, listener: Callable[[str, int, int], None]) -> None:  # noqa: B027 - optional hook
        """`listener(variant, replicas, queued_samples)`: a backend whose variants run as replicas
        elsewhere (Ray Serve) reports them, for the latency model's queue. Default: unused."""

    @abstractmethod
    async def start(self) -> None:
        """Load or connect; a variant that cannot serve is marked unhealthy, not fatal."""

    async def retire(self) -> None:  # noqa: B027 - optional hook, a no-op unless a server holds the version
        """This version no longer takes traffic: release what a shared server keeps for it.
        Default: nothing (an embedded backend's close() releases everything)."""

    @abstractmethod
    async def close(self) -> None:
        """Release sessions, threads and connections."""

    @abstractmethod
    def variants(self) -> dict[str, VariantHealth]:
        """Health of every served variant, by key."""

    def ready(self) -> bool:
        """At least one variant can serve."""
        return any(h.healthy for h in self.variants().values())

    @abstractmethod
    async def infer(self, variant_key: str, images: np.ndarray) -> np.ndarray:
        """images (N, 3, H, W) float32, normalised → logits (N, num_classes) float32.

        Raises VariantUnavailable or BackendError; cancellation (the gateway's deadline) is
        honoured at least by not delivering a late result.
        """
