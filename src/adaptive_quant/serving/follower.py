"""The follower: every gateway worker follows the repository's versions.json without a restart.

One asyncio task per worker (started by the app's lifespan):
  1. stat versions.json every rollout.poll_s (core.versions.index_stamp: inode, mtime and size, cheap);
  2. on a change, read the index; a version that became live (serving or canary) and is not held
     here is loaded in the background, on its own backend (factory.load_version: start, checks,
     warm-up, profiles scaled from the serving version's, nothing timed under live load), while
     the current versions keep serving;
  3. then the version set is swapped in one reference assignment, between requests
     (ClassifierService.set_versions): a request that picked a version finishes on it;
  4. a version no longer live is unloaded once nothing is in flight on it (its requests and the
     mirrors running on it): the backend's `retire()` hook (Triton lets the version go), then
     `close()`.
Promotion loads nothing: the canary's loaded model becomes the serving one. A version that fails
to load is FAILED in this worker (logged, with why, and in /v1/status) and never retried here
(versions are immutable: it would fail again); the serving version keeps serving. When the new
serving version fails to load, the one serving now keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from adaptive_quant.core.manifest import Manifest, ManifestError
from adaptive_quant.core.versions import VersionIndex, index_stamp, load_version_manifest, read_index
from adaptive_quant.serving.model import ServedModel
from adaptive_quant.serving.service import ClassifierService
from adaptive_quant.serving.versions import CANARY, FAILED, LOADING, RETIRED, SERVING, VersionBook, VersionSet

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # s between checks that nothing is in flight on a version being unloaded

# (manifest of version N, the serving model) → version N loaded and ready (factory.load_version)
Loader = Callable[[Manifest, ServedModel], Awaitable[ServedModel]]


class VersionFollower:
    """Keeps one worker's version set in step with the repository's index."""

    def __init__(
        self,
        service: ClassifierService,
        book: VersionBook,
        repository: str | Path,
        loader: Loader,
        poll_s: float,
        drain_timeout_s: float,
    ) -> None:
        self.service = service
        self.book = book
        self.repository = Path(repository)
        self.loader = loader
        self.poll_s = poll_s
        self.drain_timeout_s = drain_timeout_s  # s a retired version may keep requests before it is closed anyway
        self.loaded: dict[int, ServedModel] = {m.version: m for m in service.versions.live()}
        serving = service.versions.serving
        book.set_state(serving.version, SERVING, model=serving)
        self._stamp: tuple[int, int, int] | None | str = "unread"
        self._task: asyncio.Task | None = None
        self._drains: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self, follow: bool) -> None:
        """Apply the index now (a live canary is loaded in the background) and, with `follow`,
        keep polling it."""
        self._task = asyncio.create_task(self._run(follow), name="version-follower")

    async def close(self) -> None:
        """Stop following; close every backend this follower loaded (shutdown: no retire(),
        the other workers still serve those versions)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        serving = self.service.versions.serving
        for model in list(self.loaded.values()):
            if model is not serving:  # the app's lifespan closes the serving version's backend
                await model.backend.close()
        self.loaded = {serving.version: serving}

    async def _run(self, follow: bool) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die: the versions held keep serving
                log.exception("roll-out: following %s failed; trying again", self.repository)
            if not follow:
                return
            await asyncio.sleep(self.poll_s)

    # ------------------------------------------------------------------ one step

    async def step(self) -> bool:
        """Read the index if it changed, and act on it; True when it was read."""
        stamp = index_stamp(self.repository)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            index = read_index(self.repository)
        except (ManifestError, OSError) as exc:
            log.error(
                "roll-out: cannot read the index of %s (%s); the versions held keep serving", self.repository, exc
            )
            return True
        await self.apply(index)
        return True

    async def apply(self, index: VersionIndex) -> None:
        """Load what became live, swap the version set, unload what is no longer live."""
        for version in index.live():
            if version not in self.loaded and self.book.state(version) != FAILED:
                await self._load(version)
        # the index may have moved on while a version loaded: act on the newest one read
        latest = self._reread(index)
        if latest is not index:
            await self.apply(latest)
            return
        current = self.service.versions
        serving = self.loaded.get(index.serving, current.serving)
        if serving.version != index.serving:
            log.error(
                "roll-out: version %d should serve but cannot here (%s); version %d keeps serving",
                index.serving,
                self.book.records[index.serving].detail if index.serving in self.book.records else "not loaded",
                serving.version,
            )
        canary = None
        if index.canary is not None and index.canary.version != serving.version:
            canary = self.loaded.get(index.canary.version)
        share = index.canary.share if canary is not None and index.canary else 0.0
        mirror = index.canary.mirror_share if canary is not None and index.canary else 0.0
        new = VersionSet(serving, canary, share, mirror)
        if (new.serving, new.canary, new.share, new.mirror_share) != (
            current.serving,
            current.canary,
            current.share,
            current.mirror_share,
        ):
            self.service.set_versions(new)  # between requests: one reference
            if canary is not None:
                self.service.metrics.declare_mirrors(canary.label)
            log.info(
                "roll-out: serving version %d%s",
                serving.version,
                f", canary version {canary.version} (share {share:g}, mirrored {mirror:g})" if canary else "",
            )
        self.book.set_state(serving.version, SERVING, model=serving)
        if canary is not None:
            self.book.set_state(canary.version, CANARY, model=canary)
        for version, model in list(self.loaded.items()):
            if model is not serving and model is not canary:
                del self.loaded[version]
                self._retire(model, index)

    def _reread(self, index: VersionIndex) -> VersionIndex:
        stamp = index_stamp(self.repository)
        if stamp == self._stamp:
            return index
        self._stamp = stamp
        try:
            return read_index(self.repository)
        except (ManifestError, OSError) as exc:
            log.error("roll-out: cannot read the index of %s (%s); acting on the one read before", self.repository, exc)
            return index

    async def _load(self, version: int) -> None:
        self.book.set_state(version, LOADING)
        t = time.perf_counter()
        log.info("roll-out: loading version %d in the background", version)
        try:
            manifest = load_version_manifest(self.repository, version)
            model = await self.loader(manifest, self.service.versions.serving)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a version that cannot serve never takes traffic
            why = str(exc) or repr(exc)
            log.error("roll-out: version %d FAILED to load here: %s; the serving version keeps serving", version, why)
            self.book.set_state(version, FAILED, f"failed to load: {why}")
            return
        self.loaded[version] = model
        log.info("roll-out: version %d loaded and warmed up in %.2f s", version, time.perf_counter() - t)

    # ------------------------------------------------------------------ unloading

    def _retire(self, model: ServedModel, index: VersionIndex) -> None:
        record = index.versions.get(model.version)
        why = f"no longer live (index: {record.state.value})" if record else "no longer live"
        if record is not None and record.detail:
            why += f": {record.detail}"
        self.book.set_state(model.version, RETIRED, f"{why}; draining")
        task = asyncio.create_task(self._drain_and_close(model, why), name=f"unload-v{model.version}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain_and_close(self, model: ServedModel, why: str) -> None:
        """Unload `model` once nothing is in flight on it (or after drain_timeout_s). Cancelled
        (shutdown), it is closed without retire(): the other workers may still serve it."""
        try:
            deadline = time.monotonic() + self.drain_timeout_s
            while model.usage.busy() and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            if model.usage.busy():
                log.warning(
                    "roll-out: version %d still has %d request(s) and %d mirror(s) in flight after %.0f s; unloading it",
                    model.version,
                    model.usage.in_flight,
                    model.usage.mirrors,
                    self.drain_timeout_s,
                )
            retire = getattr(model.backend, "retire", None)  # Triton lets the version go (backends/base.py)
            if retire is not None:
                try:
                    await retire()
                except Exception as exc:
                    log.warning("roll-out: retiring version %d on its backend failed: %s", model.version, exc)
        finally:
            await model.backend.close()
        if self.book.state(model.version) == RETIRED:
            self.book.set_state(model.version, RETIRED, f"{why}; unloaded")
            self.book.records[model.version].model = None
        log.info("roll-out: version %d unloaded (%s)", model.version, why)
