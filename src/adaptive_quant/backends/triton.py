"""Triton backend: the same traffic, sent to a Triton Inference Server through tritonclient's aio clients.

Following Triton's client examples, readiness and every model's config are checked once at
start-up: a variant whose model is not ready, or whose config disagrees with the manifest
(input/output names, FP32, dims), is reported unhealthy and left out. Triton does the
batching (`dynamic_batching` in config.pbtxt); requests larger than a model's
`max_batch_size` are split here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..manifest import Manifest
from .base import Backend, BackendError, VariantHealth, VariantUnavailable

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")


def _client_module(protocol: str):  # noqa: ANN202 - a module
    if protocol == "grpc":
        import tritonclient.grpc.aio as module
    elif protocol == "http":
        import tritonclient.http.aio as module
    else:
        raise ValueError(f"unknown Triton protocol {protocol!r}; accepted: {', '.join(PROTOCOLS)}")
    return module


def check_model_config(raw: dict[str, Any], manifest: Manifest) -> tuple[str | None, int]:
    """(problem or None, max_batch_size) for a model config as either client returns it."""
    cfg = raw.get("config", raw)  # gRPC as_json wraps it in {"config": ...}
    max_batch = int(cfg.get("max_batch_size", 0) or 0)
    inputs = {i["name"]: i for i in cfg.get("input", [])}
    outputs = {o["name"]: o for o in cfg.get("output", [])}
    size = manifest.image_size
    if manifest.input_name not in inputs:
        return f"config has inputs {sorted(inputs)}, expected {manifest.input_name!r}", max_batch
    if manifest.output_name not in outputs:
        return f"config has outputs {sorted(outputs)}, expected {manifest.output_name!r}", max_batch
    inp = inputs[manifest.input_name]
    if inp.get("data_type") != "TYPE_FP32":
        return f"input {manifest.input_name!r} is {inp.get('data_type')}, expected TYPE_FP32", max_batch
    dims = [int(d) for d in inp.get("dims", [])]  # gRPC JSON gives int64 as strings
    if max_batch == 0:
        dims = dims[1:]  # no implicit batch dimension: the first dim is the batch
    if dims != [3, size, size]:
        return f"input {manifest.input_name!r} has dims {dims}, expected [3, {size}, {size}]", max_batch
    return None, max_batch


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        manifest: Manifest,
        url: str = "127.0.0.1:8001",
        protocol: str = "grpc",
        client_factory: Callable[[str], Any] | None = None,  # tests inject a fake client
        **_ignored: Any,  # embedded-only knobs (batching) are Triton's business here
    ) -> None:
        self.manifest = manifest
        self.url = url
        self.protocol = protocol
        self._module = _client_module(protocol) if client_factory is None else None
        self._factory = client_factory or (lambda u: self._module.InferenceServerClient(url=u))
        self._client: Any = None
        self._health = {v.key: VariantHealth(v.key, False, "not started") for v in manifest.served_variants()}
        self._model_name = {v.key: v.triton_name for v in manifest.served_variants()}
        self._max_batch: dict[str, int] = {}

    async def start(self) -> None:
        self._client = self._factory(self.url)
        try:
            server_ready = await self._client.is_server_ready()
        except Exception as exc:  # connection refused, DNS, TLS...
            server_ready = False
            reason = f"Triton at {self.url} ({self.protocol}) is unreachable: {exc}"
        else:
            reason = f"Triton at {self.url} is not ready"
        if not server_ready:
            log.error(reason)
            self._health = {k: VariantHealth(k, False, reason) for k in self._health}
            return
        for key, model in self._model_name.items():
            self._health[key] = await self._check_model(key, model)
            log.log(logging.INFO if self._health[key].healthy else logging.WARNING,
                    "Triton model %s (variant %s): %s", model, key, self._health[key].detail)

    async def _check_model(self, key: str, model: str) -> VariantHealth:
        try:
            if not await self._client.is_model_ready(model):
                return VariantHealth(key, False, f"Triton model {model!r} is not ready")
            kwargs = {"as_json": True} if self.protocol == "grpc" else {}  # gRPC returns protobuf otherwise
            raw = await self._client.get_model_config(model, **kwargs)
        except Exception as exc:
            return VariantHealth(key, False, f"Triton model {model!r}: {exc}")
        problem, max_batch = check_model_config(raw, self.manifest)
        if problem is not None:
            return VariantHealth(key, False, f"Triton model {model!r}: {problem}")
        self._max_batch[key] = max_batch
        return VariantHealth(key, True, "ok")

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            finally:
                self._client = None

    def variants(self) -> dict[str, VariantHealth]:
        return dict(self._health)

    async def infer(self, variant_key: str, images: np.ndarray) -> np.ndarray:
        health = self._health.get(variant_key)
        if health is None or not health.healthy or self._client is None:
            raise VariantUnavailable(f"variant {variant_key!r} cannot serve: {health.detail if health else 'unknown'}")
        x = np.ascontiguousarray(images, dtype=np.float32)
        step = self._max_batch.get(variant_key) or x.shape[0]
        chunks = [x[i : i + step] for i in range(0, x.shape[0], step)]
        outs = await asyncio.gather(*(self._infer_one(variant_key, c) for c in chunks))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _infer_one(self, variant_key: str, x: np.ndarray) -> np.ndarray:
        module = self._module or _client_module(self.protocol)
        model = self._model_name[variant_key]
        inp = module.InferInput(self.manifest.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = module.InferRequestedOutput(self.manifest.output_name)
        try:
            result = await self._client.infer(model, [inp], outputs=[out])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # InferenceServerException, connection errors
            raise BackendError(f"Triton model {model!r} failed: {exc}") from exc
        logits = result.as_numpy(self.manifest.output_name)
        if logits is None:
            raise BackendError(f"Triton model {model!r} returned no {self.manifest.output_name!r}")
        return logits
