"""One variant's Ray Serve replica: ONNX Runtime sessions of that variant, per model version.

The class is plain Python; serving/ray/app.py makes it a deployment (`variant-<key>`). Each
replica serves every version a caller names: the versions in its user_config are loaded before
the replica reports ready (a roll-out updates the config in place, without restarting the
replica), and a version a caller names that it does not hold yet is loaded on first use. At
most `keep_versions` stay loaded; the least recently used goes.

Batching is the project's own DynamicBatcher (backends/batcher.py, through EmbeddedBackend):
it counts samples, not calls, and splits a large request; `serve.batch` would count calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import numpy as np

from adaptive_quant.core.manifest import ManifestError
from adaptive_quant.core.versions import load_version_manifest
from adaptive_quant.serving.backends.base import VariantUnavailable
from adaptive_quant.serving.backends.embedded import EmbeddedBackend

log = logging.getLogger(__name__)


class VariantReplica:
    def __init__(self, repository: str, key: str, backend_options: dict[str, Any], keep_versions: int = 3) -> None:
        self.repository = repository
        self.key = key
        self.options = backend_options
        self.keep_versions = keep_versions
        self._versions: OrderedDict[int, EmbeddedBackend] = OrderedDict()
        self._loading: dict[int, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._replica, self._node = _placement()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config {"versions": [1, 2]}: load these before serving (a roll-out's update)."""
        for version in config.get("versions", []):
            await self._backend(int(version))

    async def infer(self, version: int, images: np.ndarray) -> tuple[np.ndarray, int, str, str]:
        """images (N, 3, H, W) float32 → (logits (N, classes), samples queued here now, replica id, node id)."""
        backend = await self._backend(version)
        logits = await backend.infer(self.key, images)
        return logits, backend.queued_samples(self.key), self._replica, self._node

    def loaded_versions(self) -> list[int]:
        return list(self._versions)

    async def _backend(self, version: int) -> EmbeddedBackend:
        backend = self._versions.get(version)
        if backend is not None:
            self._versions.move_to_end(version)
            return backend
        async with self._lock:  # one load at a time; a second caller waits for the first's
            backend = self._versions.get(version)
            if backend is None:
                backend = await self._load(version)
                self._versions[version] = backend
                while len(self._versions) > self.keep_versions:
                    old, evicted = self._versions.popitem(last=False)
                    log.info("variant %s: version %d unloaded (keeping %d)", self.key, old, self.keep_versions)
                    await evicted.close()
            return backend

    async def _load(self, version: int) -> EmbeddedBackend:
        try:
            manifest = load_version_manifest(self.repository, version)  # manifest.json in a repository without versions
        except ManifestError as exc:  # a version this repository does not have (yet, on this node)
            raise VariantUnavailable(f"variant {self.key!r} cannot serve version {version}: {exc}") from exc
        backend = EmbeddedBackend(self.repository, manifest, variants=[self.key], **self.options)
        await backend.start()
        health = backend.variants().get(self.key)
        if health is None or not health.healthy:
            await backend.close()
            detail = health.detail if health else f"version {version} does not serve {self.key}"
            raise VariantUnavailable(f"variant {self.key!r} version {version} cannot serve: {detail}")
        log.info("variant %s: version %d loaded", self.key, version)
        return backend


def _placement() -> tuple[str, str]:
    """(this replica's id, its node's id); ("local", "local") outside a replica (unit tests)."""
    try:
        import ray
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().get_node_id()
    except Exception:
        return "local", "local"
