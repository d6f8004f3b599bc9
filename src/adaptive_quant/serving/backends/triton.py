"""Triton backend: the same traffic, sent to a Triton Inference Server through tritonclient's aio clients.

One backend serves one model version (its manifest's `version`): every readiness, config and
inference call pins `model_version`, because Triton may hold several versions of a model side
by side (config.pbtxt's `version_policy` lists the serving and canary ones).

Following Triton's client examples, readiness and every model's config are checked at
start-up: a variant whose model version is not ready, or whose config disagrees with the manifest
(input/output names, FP32, dims), is reported unhealthy and left out. Triton does the
batching (`dynamic_batching` in config.pbtxt); requests larger than a model's
`max_batch_size` are split here.

A background monitor (every `health_interval_s`) keeps that picture true while serving:
Triton unreachable → every variant unhealthy (the gateway answers 503, /readyz false) and the
client is replaced, so a restarted server is found again without waiting out gRPC's reconnect
back-off; Triton back → the variants are checked again and serve. With
`model_control="explicit"` (Triton started with --model-control-mode=explicit) the gateway
owns which variants are loaded: `load_variant` / `unload_variant` go through Triton's
repository API, and the monitor loads every variant that should be loaded but is not (after
a Triton restart, say), at most once per `load_retry_s`.

Versions under explicit control: `start()` loads a version that is not ready with
`load_model(name)`; Triton re-reads config.pbtxt and loads the versions its policy lists that it
does not hold, while those it holds keep serving. Several gateway workers start the same version:
each checks the pinned version's readiness first and waits for a load another one has under way
(Triton's repository index says LOADING) instead of asking again. `retire()`, once the policy no
longer lists this version, waits until no worker has used it for `retire_quiet_s`, then calls
`load_model(name)` again: Triton applies the policy and unloads the version after its in-flight
requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptive_quant.core.manifest import Manifest
from adaptive_quant.serving.backends.base import Backend, BackendError, VariantHealth, VariantUnavailable

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
MODEL_CONTROL = ("none", "explicit")


@dataclass
class ModelState:
    """Whether a variant's Triton model (this backend's version of it) is loaded, and why (for /v1/status)."""

    wanted: bool = True  # the gateway wants it loaded (False after a deliberate unload)
    loaded: bool = False  # last seen ready on the server
    reason: str = "not started"
    since: float = 0.0  # time.time() of the last change, s
    last_load_attempt: float = float("-inf")  # time.monotonic(), s


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


def index_state(raw: Any, model: str, version: str) -> str | None:
    """State of one model version ("READY", "LOADING", "UNAVAILABLE", ...) in Triton's repository
    index as either client returns it (gRPC as_json: {"models": [...]}; HTTP: a list); None if absent."""
    entries = raw.get("models", []) if isinstance(raw, dict) else raw
    for e in entries or []:
        if e.get("name") == model and str(e.get("version", "")) == version:
            return str(e.get("state", "")) or None
    return None


def version_activity(raw: Any, version: str) -> tuple[str, str] | None:
    """(inference_count, last_inference) of one version in Triton's inference statistics, as strings
    (gRPC JSON gives int64 as strings, HTTP as ints): it changes whenever any client used the version."""
    for st in (raw or {}).get("model_stats", []):
        if str(st.get("version", "")) == version:
            return str(st.get("inference_count", "")), str(st.get("last_inference", ""))
    return None


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        manifest: Manifest,
        url: str = "127.0.0.1:8001",
        protocol: str = "grpc",
        client_factory: Callable[[str], Any] | None = None,  # tests inject a fake client
        model_control: str = "none",  # "explicit": the gateway loads/unloads models through Triton's API
        health_interval_s: float = 1.0,  # s between health checks while serving; 0 = only at start-up
        probe_timeout_s: float = 2.0,  # s a health or config call may take before Triton counts as down
        load_timeout_s: float = 120.0,  # s a model load may take (a big ONNX model on a busy GPU)
        load_retry_s: float = 30.0,  # s before a failed automatic load is tried again
        # retire(): s without an inference on this version by any client (other gateway workers may
        # still be switching: they follow versions.json every rollout.poll_s) before Triton drops it,
        # and the longest retire() waits for that quiet before it drops the version anyway
        retire_quiet_s: float = 2.0,
        retire_timeout_s: float = 60.0,
        # the variant keys this backend serves (None: every served variant of the manifest); a
        # version loaded while another serves takes only those the gateway routes to
        variants: list[str] | None = None,
        # load (and check) the models at once; False: one after another, for a version loaded under
        # live traffic, whose Python-backend stubs would otherwise start together and take every core
        parallel_loads: bool = True,
        **_ignored: Any,  # embedded-only knobs (batching) are Triton's business here
    ) -> None:
        if model_control not in MODEL_CONTROL:
            raise ValueError(f"unknown model_control {model_control!r}; accepted: {', '.join(MODEL_CONTROL)}")
        self.manifest = manifest
        self.url = url
        self.protocol = protocol
        self.model_control = model_control
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.load_timeout_s = load_timeout_s
        self.load_retry_s = load_retry_s
        self.retire_quiet_s = retire_quiet_s
        self.retire_timeout_s = retire_timeout_s
        self.version = int(getattr(manifest, "version", 1))  # a manifest written before versions: 1
        self.model_version = str(self.version)  # pinned on every call (tritonclient takes it as a string)
        self._module = _client_module(protocol) if client_factory is None else None
        self._factory = client_factory or (lambda u: self._module.InferenceServerClient(url=u))
        self._client: Any = None
        served = [v for v in manifest.served_variants() if variants is None or v.key in variants]
        self._health = {v.key: VariantHealth(v.key, False, "not started") for v in served}
        self._model_name = {v.key: v.triton_name for v in served}
        self.parallel_loads = parallel_loads
        self._max_batch: dict[str, int] = {}
        self._states = {k: ModelState() for k in self._health}
        self._server_up = False
        self._monitor: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one refresh / load / unload at a time
        self._old_clients: list[Any] = []  # replaced clients, closed later (in-flight calls may still use them)
        self._retiring = False  # retire() ran: the version is leaving Triton, the monitor loads nothing

    @property
    def supports_model_control(self) -> bool:
        return self.model_control == "explicit"

    async def start(self) -> None:
        self._client = self._factory(self.url)
        await self.refresh(log_all=True)
        if self.health_interval_s > 0:
            self._monitor = asyncio.create_task(self._watch(), name="triton-health")

    async def _call(self, coro: Any, timeout_s: float | None = None) -> Any:
        return await asyncio.wait_for(coro, self.probe_timeout_s if timeout_s is None else timeout_s)

    async def refresh(self, log_all: bool = False) -> None:
        """Check the server, then every variant that is not known to be serving (all of them on `log_all`)."""
        async with self._lock:
            if self._retiring:
                return
            if self._client is None:
                self._client = self._factory(self.url)
            try:
                server_ready = bool(await self._call(self._client.is_server_ready()))
            except Exception as exc:  # connection refused, DNS, TLS, timeout...
                self._server_down(
                    f"Triton at {self.url} ({self.protocol}) is unreachable: {type(exc).__name__}: {exc}", log_all
                )
                return
            if not self._server_up:
                log.info("Triton at %s answers (server ready: %s)", self.url, server_ready)
            self._server_up = True
            # not ready (e.g. strict readiness while a model loads) is not down: each model's own
            # readiness decides whether its variant serves. Models are checked (and loaded) at the
            # same time: Triton loads them in parallel, so a new version is ready sooner
            keys = [
                k
                for k in self._model_name
                if (log_all or not self._health[k].healthy)
                and not (self.supports_model_control and not self._states[k].wanted)  # deliberately unloaded
            ]
            if self.parallel_loads:
                await asyncio.gather(*(self._refresh_one(k, log_all) for k in keys))
            else:
                for k in keys:
                    await self._refresh_one(k, log_all)

    async def _refresh_one(self, key: str, log_all: bool) -> None:
        """Check one variant's model version; load it when it should be loaded and is not. Caller holds the lock."""
        model, state = self._model_name[key], self._states[key]
        health = await self._check_model(key, model)
        if (
            not health.healthy
            and self.supports_model_control
            and state.wanted
            and time.monotonic() - state.last_load_attempt >= self.load_retry_s
        ):
            health = await self._load(key, "loaded by the gateway: it should be loaded and was not")
        if health.healthy and not state.loaded:
            self._set_state(key, True, f"version {self.version} ready on the server")
        elif not health.healthy:
            self._set_state(key, False, health.detail)
        if health != self._health[key] or log_all:
            log.log(
                logging.INFO if health.healthy else logging.WARNING,
                "Triton model %s version %s (variant %s): %s",
                model,
                self.version,
                key,
                health.detail,
            )
        self._health[key] = health

    def _server_down(self, reason: str, log_all: bool) -> None:
        if self._server_up or log_all:
            log.error(reason)
        self._server_up = False
        for k in self._health:
            self._health[k] = VariantHealth(k, False, reason)
            if self._states[k].wanted or not self.supports_model_control:
                self._set_state(k, False, "Triton is unreachable")
        # a fresh client next time: gRPC's channel would otherwise retry on its own back-off (up to minutes)
        if self._client is not None:
            self._drop_client(self._client)
            self._client = None

    def _drop_client(self, client: Any) -> None:
        self._old_clients.append(client)

        async def close_later() -> None:
            await asyncio.sleep(10.0)  # s; calls still running on it have failed or finished by then
            if client in self._old_clients:
                self._old_clients.remove(client)
                try:
                    await client.close()
                except Exception:  # noqa: BLE001 - closing a dead channel may complain
                    pass

        asyncio.get_running_loop().create_task(close_later())

    def _set_state(self, key: str, loaded: bool, reason: str) -> None:
        st = self._states[key]
        if st.loaded != loaded or st.reason != reason:
            st.loaded, st.reason, st.since = loaded, reason, time.time()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the monitor die: log and keep watching
                log.exception("Triton health check failed")

    async def _load(self, key: str, reason: str) -> VariantHealth:
        """Make this version of the variant's model ready through the repository API; caller holds the lock.

        load_model is not free even when nothing changed (Triton re-reads the model folder, and reloads
        a version whose files it finds newer), and other gateway workers start the same version: so
        the pinned version's readiness is checked first, and a load already under way is waited for.
        """
        model = self._model_name[key]
        self._states[key].last_load_attempt = time.monotonic()
        # the checks of a load may take its time: while models load, a small host answers slowly
        health = await self._check_model(key, model, self.load_timeout_s)
        if not health.healthy and await self._index_state(model) == "LOADING":
            health = await self._wait_loading(key, model)
        if not health.healthy:
            try:  # Triton re-reads config.pbtxt: versions its policy lists load, those it holds keep serving
                await self._call(self._client.load_model(model), self.load_timeout_s)
            except Exception as exc:
                return VariantHealth(
                    key, False, f"Triton could not load {model!r} (version {self.version}): {type(exc).__name__}: {exc}"
                )
            health = await self._check_model(key, model, self.load_timeout_s)
            if not health.healthy:
                health = VariantHealth(key, False, f"{health.detail} after load_model (is it in its version_policy?)")
        if health.healthy:
            self._set_state(key, True, reason)
            log.info("Triton model %s version %s (variant %s) loaded: %s", model, self.version, key, reason)
        return health

    async def _index_state(self, model: str) -> str | None:
        """This version's state in Triton's repository index; None when the index cannot be read."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        try:
            raw = await self._call(self._client.get_model_repository_index(**kwargs), self.load_timeout_s)
        except Exception:  # noqa: BLE001 - the index only saves a redundant load
            return None
        return index_state(raw, model, self.model_version)

    async def _wait_loading(self, key: str, model: str) -> VariantHealth:
        """Another client's load of this version is under way: wait for it (up to load_timeout_s)."""
        log.info("Triton model %s version %s is loading (another worker's load): waiting", model, self.version)
        deadline = time.monotonic() + self.load_timeout_s
        health = await self._check_model(key, model, self.load_timeout_s)
        while not health.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # s between readiness checks
            health = await self._check_model(key, model, self.load_timeout_s)
            if not health.healthy and await self._index_state(model) != "LOADING":
                break  # that load ended without this version: load it ourselves
        return health

    async def load_variant(self, key: str, reason: str = "loaded on request") -> VariantHealth:
        """Load a variant's model through Triton's repository API (explicit model control only)."""
        self._require_model_control(key)
        async with self._lock:
            self._states[key].wanted = True
            if self._client is None:
                return self._health[key]  # server down: the monitor loads it when Triton is back
            health = await self._load(key, reason)
            self._health[key] = health
            if not health.healthy:
                self._set_state(key, False, health.detail)
            return health

    async def unload_variant(self, key: str, reason: str = "unloaded on request") -> None:
        """Take a variant out of routing at once, then unload its model from Triton."""
        self._require_model_control(key)
        model = self._model_name[key]
        async with self._lock:
            self._states[key].wanted = False
            self._health[key] = VariantHealth(key, False, f"unloaded: {reason}")  # the router stops now
            self._set_state(key, False, reason)
            if self._client is None:
                return
            try:  # Triton lets in-flight requests finish before the model goes
                await self._call(self._client.unload_model(model), self.load_timeout_s)
            except Exception as exc:
                log.warning("Triton could not unload %s: %s (left out of routing anyway)", model, exc)
                return
        log.info("Triton model %s (variant %s) unloaded: %s", model, key, reason)

    def _require_model_control(self, key: str) -> None:
        if key not in self._model_name:
            raise KeyError(f"unknown variant {key!r}; served: {', '.join(self._model_name)}")
        if not self.supports_model_control:
            raise BackendError(
                "loading and unloading needs backend.model_control=explicit "
                "(and Triton started with --model-control-mode=explicit)"
            )

    async def retire(self) -> None:
        """This version left the version policy: let Triton drop it (explicit model control; else a no-op).

        Routing to it stops at once. Then, once no client has used the version for retire_quiet_s
        (Triton's inference statistics; at most retire_timeout_s), `load_model(name)` makes Triton
        re-read config.pbtxt, whose policy no longer lists the version: Triton unloads it after its
        in-flight requests, and the versions the policy lists keep serving. A version already gone
        (another worker retired it) costs one readiness call per model.
        """
        self._retiring = True
        for key in self._health:
            self._health[key] = VariantHealth(key, False, f"version {self.version} retired")
            self._set_state(key, False, f"version {self.version} retired")
        if not self.supports_model_control or self._client is None:
            return
        models = sorted(set(self._model_name.values()))
        await self._wait_quiet(models)
        async with self._lock:
            client = self._client
            if client is None:
                return
            for model in models:
                try:
                    ready = client.is_model_ready(model, model_version=self.model_version)
                    if not await self._call(ready, self.load_timeout_s):
                        continue  # already dropped (another worker's retire) or never loaded
                    await self._call(client.load_model(model), self.load_timeout_s)
                    ready = client.is_model_ready(model, model_version=self.model_version)
                    still = await self._call(ready, self.load_timeout_s)
                except Exception as exc:  # noqa: BLE001 - Triton down: it holds nothing then
                    log.warning("Triton model %s version %s not retired: %s", model, self.version, exc)
                    continue
                if still:
                    log.warning(
                        "Triton model %s version %s is still loaded after load_model: "
                        "its config.pbtxt version_policy still lists it",
                        model,
                        self.version,
                    )
                else:
                    log.info(
                        "Triton model %s version %s retired (unloaded after its in-flight requests)",
                        model,
                        self.version,
                    )

    async def _wait_quiet(self, models: list[str]) -> None:
        """Until no client has run this version of `models` for retire_quiet_s (or retire_timeout_s passed)."""
        if self.retire_quiet_s <= 0:
            return
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        start = last_change = time.monotonic()
        last: list[Any] | None = None
        while True:
            try:
                seen = [
                    version_activity(
                        await self._call(
                            self._client.get_inference_statistics(model, model_version=self.model_version, **kwargs)
                        ),
                        self.model_version,
                    )
                    for model in models
                ]
            except Exception:  # noqa: BLE001 - no statistics (Triton down, version gone): nothing to drain
                return
            now = time.monotonic()
            if seen != last:
                last, last_change = seen, now
            elif now - last_change >= self.retire_quiet_s:
                return
            if now - start >= self.retire_timeout_s:
                log.warning(
                    "version %s was still used %.0f s after it was retired; dropping it from Triton anyway",
                    self.version,
                    now - start,
                )
                return
            await asyncio.sleep(min(0.25, self.retire_quiet_s / 4))  # s between statistics reads

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Per variant: version (the pinned one), loaded (bool), wanted (bool), reason, since (unix time s)."""
        return {
            k: {
                "version": self.version,
                "loaded": s.loaded,
                "wanted": s.wanted,
                "reason": s.reason,
                "since": round(s.since, 3),
            }
            for k, s in self._states.items()
        }

    async def _check_model(self, key: str, model: str, timeout_s: float | None = None) -> VariantHealth:
        """Ready and configured as the manifest says? Each call may take `timeout_s` (probe_timeout_s)."""
        what = f"Triton model {model!r} version {self.version}"
        try:
            ready = self._client.is_model_ready(model, model_version=self.model_version)
            if not await self._call(ready, timeout_s):
                return VariantHealth(key, False, f"{what} is not ready")
            kwargs = {"as_json": True} if self.protocol == "grpc" else {}  # gRPC returns protobuf otherwise
            config = self._client.get_model_config(model, model_version=self.model_version, **kwargs)
            raw = await self._call(config, timeout_s)
        except Exception as exc:
            return VariantHealth(key, False, f"{what}: {type(exc).__name__}: {exc}")
        problem, max_batch = check_model_config(raw, self.manifest)
        if problem is not None:
            return VariantHealth(key, False, f"{what}: {problem}")
        self._max_batch[key] = max_batch
        return VariantHealth(key, True, "ok")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it was told to stop
                pass
            self._monitor = None
        clients = [c for c in (self._client, *self._old_clients) if c is not None]
        self._client, self._old_clients = None, []
        for c in clients:
            try:
                await c.close()
            except Exception:  # noqa: BLE001 - closing a dead channel may complain
                pass

    def variants(self) -> dict[str, VariantHealth]:
        return dict(self._health)

    async def infer(self, variant_key: str, images: np.ndarray) -> np.ndarray:
        health = self._health.get(variant_key)
        client = self._client
        if health is None or not health.healthy or client is None:
            raise VariantUnavailable(f"variant {variant_key!r} cannot serve: {health.detail if health else 'unknown'}")
        x = np.ascontiguousarray(images, dtype=np.float32)
        step = self._max_batch.get(variant_key) or x.shape[0]
        chunks = [x[i : i + step] for i in range(0, x.shape[0], step)]
        outs = await asyncio.gather(*(self._infer_one(client, variant_key, c) for c in chunks))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _infer_one(self, client: Any, variant_key: str, x: np.ndarray) -> np.ndarray:
        module = self._module or _client_module(self.protocol)
        model = self._model_name[variant_key]
        inp = module.InferInput(self.manifest.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = module.InferRequestedOutput(self.manifest.output_name)
        try:
            result = await client.infer(model, [inp], model_version=self.model_version, outputs=[out])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # InferenceServerException, connection errors
            raise BackendError(f"Triton model {model!r} version {self.version} failed: {exc}") from exc
        logits = result.as_numpy(self.manifest.output_name)
        if logits is None:
            raise BackendError(
                f"Triton model {model!r} version {self.version} returned no {self.manifest.output_name!r}"
            )
        return logits
