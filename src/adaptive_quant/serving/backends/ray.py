"""Ray Serve backend: each variant is a deployment of its own (serving/ray/replica.py), called
through a DeploymentHandle from the gateway's ingress replica (`aq-serve --engine ray`).

The calls carry the model version this backend serves, so a request is answered wholly by one
version even while replicas hold two (a roll-out). Every answer also reports how many samples
wait on the replica that computed it; with the running replicas per deployment (read from
Serve's controller every `status_interval_s`) that goes to the latency model, so the planner
sees queues other ingress replicas built up, spread over the replicas that work them off.

Calls are coalesced: a Ray call costs ~2.4 ms of CPU on this 2-vCPU host (measured: a no-op
ingress answered 187 req/s, 129 with one handle call added), more than an INT8 image's compute,
so at most `calls_per_replica` calls per running replica are in flight to a variant, and the
samples of requests that arrive meanwhile go together in the next call (up to max_batch_size).
Alone, a request is sent at once.

Deadlines: the gateway cancels the awaiting task; a request still queued here is dropped, one
already sent is computed for the others in its call. A replica that dies or fails answers
BackendError, and the gateway falls back as it does for the embedded backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from adaptive_quant.core.manifest import Manifest
from adaptive_quant.serving.backends.base import Backend, BackendError, VariantHealth, VariantUnavailable

log = logging.getLogger(__name__)

DEPLOYMENT_PREFIX = "variant-"
REPORT_FRESH_S = 2.0  # s a replica's queue report counts; older ones (an idle replica) read as 0


def deployment_name(variant_key: str) -> str:
    """The Serve deployment that serves `variant_key` ("int8" → "variant-int8")."""
    return f"{DEPLOYMENT_PREFIX}{variant_key}"


class CallCoalescer:
    """Concurrent calls to one variant → one Ray call per batch, at most `limit()` in flight."""

    def __init__(
        self, send: Callable[[np.ndarray], Awaitable[np.ndarray]], max_batch_size: int, limit: Callable[[], int]
    ) -> None:
        self._send = send
        self.max_batch_size = max_batch_size
        self._limit = limit
        self._queue: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._in_flight = 0
        self.calls = 0
        self.samples = 0

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """x (n, ...) → the variant's answer for x, sent alone or with other callers' samples."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((x, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._queue and self._in_flight < max(1, self._limit()):
            batch: list[tuple[np.ndarray, asyncio.Future]] = []
            size = 0
            while self._queue:
                x, future = self._queue[0]
                if future.done():  # its caller gave up (deadline): not sent
                    self._queue.popleft()
                    continue
                if batch and size + x.shape[0] > self.max_batch_size:
                    break
                batch.append(self._queue.popleft())
                size += x.shape[0]
            if not batch:
                return
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._call(batch, size))

    async def _call(self, batch: list[tuple[np.ndarray, asyncio.Future]], size: int) -> None:
        try:
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            self.calls += 1
            self.samples += size
            y = await self._send(x)
            start = 0
            for xi, future in batch:
                n = xi.shape[0]
                if not future.done():
                    future.set_result(y[start : start + n])
                start += n
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._pump()


class RayBackend(Backend):
    name = "ray"

    def __init__(
        self,
        manifest: Manifest,
        app_name: str = "adaptive-quant",
        variants: list[str] | None = None,
        status_interval_s: float = 2.0,
        probe_timeout_s: float = 120.0,  # s a variant deployment may take to answer its first call
        max_batch_size: int = 32,  # samples per Ray call at most
        calls_per_replica: int = 2,  # Ray calls in flight per running replica of a variant
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manifest = manifest
        self.app_name = app_name
        self.status_interval_s = status_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._clock = clock
        # the variants this gateway routes to (its `variants` setting): the application deploys those only
        self._keys = [v.key for v in manifest.routed_variants(variants)]
        self._health = {k: VariantHealth(k, False, "not started") for k in self._keys}
        self._handles: dict = {}
        self._replicas: dict[str, int] = dict.fromkeys(self._keys, 1)
        # per variant: replica id → (samples queued there, clock time of the report, the node it answered from)
        self._reports: dict[str, dict[str, tuple[int, float, str]]] = {k: {} for k in self._keys}
        self._listener: Callable[[str, int, int], None] = lambda key, replicas, queued: None
        self._poller: asyncio.Task | None = None
        self._coalescers = {
            k: CallCoalescer(
                lambda x, key=k: self._call(key, x),
                max_batch_size,
                lambda key=k: calls_per_replica * self._replicas[key],
            )
            for k in self._keys
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from ray import serve

        app = self._app_name(serve)
        missing: dict[str, str] = {}
        for key in self._keys:
            try:
                self._handles[key] = serve.get_deployment_handle(deployment_name(key), app_name=app)
            except KeyError:  # deployed for other settings, or its deployment was deleted
                missing[key] = f"application {app!r} has no deployment {deployment_name(key)!r}"
        probe = np.zeros((1, 3, self.manifest.image_size, self.manifest.image_size), np.float32)

        async def check(key: str) -> VariantHealth:
            if key in missing:
                return VariantHealth(key, False, missing[key])
            try:
                out = await asyncio.wait_for(self.infer(key, probe), self.probe_timeout_s)
            except Exception as exc:  # the deployment is missing, its file damaged, its replicas failing
                return VariantHealth(key, False, f"{deployment_name(key)}: {_reason(exc)}")
            if out.shape != (1, len(self.manifest.classes)) or not np.isfinite(out).all():
                return VariantHealth(key, False, f"{deployment_name(key)} answers shape {out.shape}")
            return VariantHealth(key, True, "ok")

        self._health = {k: VariantHealth(k, True, "probing") for k in self._keys}  # infer() needs it
        for health in await asyncio.gather(*(check(k) for k in self._keys)):
            self._health[health.key] = health
            if not health.healthy:
                log.warning("variant %s is unhealthy and left out: %s", health.key, health.detail)
        self._poller = asyncio.get_running_loop().create_task(self._poll_replicas(app), name="ray-replicas")

    def _app_name(self, serve) -> str:  # noqa: ANN001 - the ray.serve module
        """The application this ingress replica belongs to (a RayService names it); else the setting."""
        try:
            return serve.get_replica_context().app_name or self.app_name
        except Exception:  # not inside a replica (a test's driver)
            return self.app_name

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._handles.clear()

    # ------------------------------------------------------------------ serving

    def set_replica_listener(self, listener: Callable[[str, int, int], None]) -> None:
        self._listener = listener

    def variants(self) -> dict[str, VariantHealth]:
        return dict(self._health)

    def batch_stats(self) -> dict[str, dict]:
        """Per variant, for /v1/status: running replicas, samples queued on them, the Ray calls sent
        from here and their samples, and every replica that answered with its node."""
        return {
            k: {
                "replicas": self._replicas[k],
                "queued_samples": self._queued(k),
                "calls": self._coalescers[k].calls,
                "samples": self._coalescers[k].samples,
                "replicas_seen": {replica: node for replica, (_, _, node) in self._reports[k].items()},
            }
            for k in self._keys
        }

    async def infer(self, variant_key: str, images: np.ndarray) -> np.ndarray:
        handle = self._handles.get(variant_key)
        health = self._health.get(variant_key)
        if handle is None or health is None or not health.healthy:
            raise VariantUnavailable(
                f"variant {variant_key!r} cannot serve: {health.detail if health else 'not a served variant'}"
            )
        return await self._coalescers[variant_key].submit(np.ascontiguousarray(images, dtype=np.float32))

    async def _call(self, variant_key: str, x: np.ndarray) -> np.ndarray:
        """One Ray call of the coalesced samples x (n, 3, H, W) → logits (n, classes)."""
        try:
            logits, queued, replica, node = await self._handles[variant_key].infer.remote(self.manifest.version, x)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RayTaskError (the replica raised), RayActorError (it died), ...
            raise BackendError(f"variant {variant_key!r} on Ray Serve failed: {_reason(exc)}") from exc
        self._reports[variant_key][replica] = (queued, self._clock(), node)
        self._listener(variant_key, self._replicas[variant_key], self._queued(variant_key))
        return logits

    def _queued(self, key: str) -> int:
        now = self._clock()
        return sum(q for q, t, _ in self._reports[key].values() if now - t <= REPORT_FRESH_S)

    async def _poll_replicas(self, app: str) -> None:
        """Running replicas per variant deployment, from Serve's controller (autoscaling and
        failures change them); a failed read keeps the last counts."""
        from ray import serve

        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app].deployments
                for key in self._keys:
                    d = deployments.get(deployment_name(key))
                    if d is not None:
                        running = int(d.replica_states.get("RUNNING", 0))
                        self._replicas[key] = max(1, running)
                        self._listener(key, self._replicas[key], self._queued(key))
                        # forget replicas gone (scaled down, died): their reports would count twice
                        reports = self._reports[key]
                        if len(reports) > running:
                            for replica, _ in sorted(reports.items(), key=lambda kv: kv[1][1])[
                                : len(reports) - running
                            ]:
                                reports.pop(replica, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("reading the replicas from Serve's controller failed: %s", exc)
            await asyncio.sleep(self.status_interval_s)


def _reason(exc: BaseException) -> str:
    """One line for a log or an error: Ray wraps a replica's exception with its traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]
