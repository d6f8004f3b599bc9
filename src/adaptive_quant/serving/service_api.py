"""What the dataplane and the fronts need of the classifier service: a typing.Protocol (the
idea of vLLM's EngineClient), so that they depend on these members only, not on how
`service.ClassifierService` is built. A stand-in (a test double, a Ray Serve handle later) that
has them can serve the same fronts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # annotations only: the service module imports the model and the backends
    from adaptive_quant.core.manifest import Manifest
    from adaptive_quant.serving.backends import Backend
    from adaptive_quant.serving.metrics import GatewayMetrics
    from adaptive_quant.serving.model import ServedModel
    from adaptive_quant.serving.options import ClassifyOptions
    from adaptive_quant.serving.service import ClassifyResult
    from adaptive_quant.serving.settings import ServeSettings
    from adaptive_quant.serving.versions import VersionSet
    from adaptive_quant.serving.worker_role import WorkerRole


class ServiceAPI(Protocol):
    """The members of `ClassifierService` the serving layer above it uses (the serving contract)."""

    settings: ServeSettings
    metrics: GatewayMetrics
    worker: WorkerRole | None
    in_flight: int  # requests in flight; the dataplane counts them, the backend's contention probe reads them
    started_at: float  # time.monotonic() s
    memory_controller: Any  # a MemoryController when memory.enabled, else None
    versions: VersionSet  # the live model versions; swapped whole by a roll-out

    @property
    def backend(self) -> Backend:
        """The serving version's backend."""
        ...

    @property
    def model(self) -> ServedModel:
        """The serving version."""
        ...

    def pick(self) -> ServedModel:
        """The version one request is served by (the canary with its share); read once per request."""
        ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def keys(self) -> list[str]:
        """(V,) the variants routed to, in column order."""
        ...

    def ready(self) -> bool:
        """At least one routed variant is healthy."""
        ...

    def routable(self) -> np.ndarray:
        """(V,) bool: healthy and not taken out by the breaker."""
        ...

    def check_options(self, options: ClassifyOptions) -> None:
        """Raises InputError (422) for options this service cannot honour."""
        ...

    async def classify(
        self, x: np.ndarray, options: ClassifyOptions, started: float, model: ServedModel | None = None
    ) -> ClassifyResult:
        """x (N, 3, H, W) float32, the model input; `started` perf_counter() s at arrival;
        `model`: the version picked for it (None: picked here)."""
        ...
