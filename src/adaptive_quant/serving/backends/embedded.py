"""Embedded backend: ONNX Runtime in-process, reading the same model repository as Triton.

One InferenceSession per served variant, each behind a DynamicBatcher; model calls run in
a thread pool (ORT releases the GIL while it computes). A variant whose file is missing,
damaged (sha256 differs from the manifest), or does not load or answer a warm-up call is
reported unhealthy and left out; the others serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adaptive_quant.core.manifest import Manifest, VariantEntry, sha256_file
from adaptive_quant.serving.backends.base import Backend, BackendError, VariantHealth, VariantUnavailable
from adaptive_quant.serving.backends.batcher import DynamicBatcher

log = logging.getLogger(__name__)


def inline_limits(variants: list[VariantEntry], inline_max_batch: int) -> dict[str, int]:
    """Samples per batch each variant may compute on the event loop: `inline_max_batch` for the
    cheapest variant, scaled down by each one's profiled batch-1 cost relative to it, and at
    least 1 (a request alone in the gateway). The limit is really one of time: three FP32
    samples on the loop (~7 ms here) stalled every request behind them, four INT8 ones (~3 ms)
    did not. Without profiles every variant gets `inline_max_batch`."""
    cost = {v.key: v.latency.at(1).p95_ms for v in variants if v.latency and v.latency.batches}
    if not inline_max_batch or len(cost) < len(variants):
        return {v.key: inline_max_batch for v in variants}
    cheapest = min(cost.values())
    return {k: max(1, int(inline_max_batch * cheapest / c)) for k, c in cost.items()}


class EmbeddedBackend(Backend):
    name = "embedded"

    def __init__(
        self,
        repository: str | Path,
        manifest: Manifest,
        max_batch_size: int = 32,  # samples per ORT call
        max_queue_delay_us: int = 0,  # µs the batcher may wait for more requests
        instances: int = 1,  # concurrent ORT calls per variant
        intra_op_threads: int = 1,  # ORT threads per call; parallelism comes from variants/instances
        providers: list[str] | None = None,
        verify_sha256: bool = True,
        memory_arena: bool = False,
        inline_max_batch: int = 0,  # batches this small compute on the event loop (batcher.py says why)
        allow_spinning: bool = False,  # ORT's pool threads spin between calls (intra_op_threads > 1)
        variants: list[str] | None = None,  # only these keys (a Ray replica serves one); None = every served one
    ) -> None:
        self.repository = Path(repository)
        self.manifest = manifest
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.instances = instances
        self.intra_op_threads = intra_op_threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.verify_sha256 = verify_sha256
        self.memory_arena = memory_arena
        self.inline_max_batch = inline_max_batch
        self.allow_spinning = allow_spinning
        self._contended: Callable[[], bool] = lambda: False
        self._served = [v for v in manifest.served_variants() if variants is None or v.key in variants]
        self._health: dict[str, VariantHealth] = {
            v.key: VariantHealth(v.key, False, "not started") for v in self._served
        }
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._batchers: dict[str, DynamicBatcher] = {}
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        variants = self._served
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, len(variants) * self.instances), thread_name_prefix="ort"
        )
        limits = inline_limits(variants, self.inline_max_batch)
        for entry in variants:
            # loading parses and optimises the graph (tens of ms): keep the loop responsive
            health, session = await asyncio.to_thread(self._load, entry)
            self._health[entry.key] = health
            if session is None:
                log.warning("variant %s is unhealthy and left out: %s", entry.key, health.detail)
                continue
            self._sessions[entry.key] = session
            batcher = DynamicBatcher(
                self._runner(session),
                self._executor,
                max_batch_size=self.max_batch_size,
                max_queue_delay_us=self.max_queue_delay_us,
                instances=self.instances,
                name=entry.key,
                inline_max_batch=limits[entry.key],
                contended=lambda: self._contended(),
            )
            batcher.start()
            self._batchers[entry.key] = batcher
            log.info("variant %s loaded from %s", entry.key, entry.path)

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        self._batchers.clear()
        self._sessions.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _load(self, entry: VariantEntry) -> tuple[VariantHealth, ort.InferenceSession | None]:
        path = self.repository / entry.path
        m = self.manifest

        def bad(detail: str) -> tuple[VariantHealth, None]:
            return VariantHealth(entry.key, False, detail), None

        if not path.is_file():
            return bad(f"model file {path} is missing")
        if self.verify_sha256 and sha256_file(path) != entry.sha256:
            return bad(f"model file {path} does not match its sha256 in manifest.json (damaged or replaced)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        # spinning keeps ORT's pool threads awake between calls: lower latency, but they burn
        # cores the event loop and other variants need; off unless configured
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        opts.log_severity_level = 3  # errors only; ORT's warnings about casts would flood the log
        if not self.memory_arena:
            # the arena and the per-shape memory plans grow with every new batch size (1..32 per
            # variant); without them RSS stays flat at the same speed (docs/results/)
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # ORT raises several types for a corrupt or unsupported graph
            return bad(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {str(exc)[:300]}")
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if m.input_name not in inputs or m.output_name not in outputs:
            return bad(
                f"{path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"expected input {m.input_name!r} and output {m.output_name!r}"
            )
        if inputs[m.input_name].type != "tensor(float)":
            return bad(f"{path} input {m.input_name!r} is {inputs[m.input_name].type}, expected tensor(float)")
        try:  # warm-up: also proves the graph runs and answers with the declared shape
            probe = np.zeros((1, 3, m.image_size, m.image_size), dtype=np.float32)
            out = session.run([m.output_name], {m.input_name: probe})[0]
        except Exception as exc:
            return bad(f"{path} fails on a warm-up call: {type(exc).__name__}: {str(exc)[:300]}")
        if out.shape != (1, len(m.classes)) or not np.isfinite(out).all():
            return bad(f"{path} answers a warm-up call with shape {out.shape} (finite={np.isfinite(out).all()})")
        return VariantHealth(entry.key, True, "ok"), session

    def _runner(self, session: ort.InferenceSession):  # noqa: ANN202 - a closure for the batcher
        input_name, output_name = self.manifest.input_name, self.manifest.output_name

        def run(x: np.ndarray) -> np.ndarray:
            return session.run([output_name], {input_name: x})[0]

        return run

    # ------------------------------------------------------------------ serving

    def set_contention_probe(self, probe: Callable[[], bool]) -> None:
        self._contended = probe

    def variants(self) -> dict[str, VariantHealth]:
        return dict(self._health)

    def queued_samples(self, variant_key: str) -> int:
        """Samples waiting for or in `variant_key`'s model calls now (0 if it does not serve)."""
        batcher = self._batchers.get(variant_key)
        return batcher.queued_samples if batcher is not None else 0

    def batch_stats(self) -> dict[str, dict[str, int]]:
        """Batches, samples and largest batch per variant since start (for /v1/status)."""
        return {
            k: {
                "batches": b.batches,
                "samples": b.samples,
                "largest_batch": b.largest_batch,
                "inline_batches": b.inline_batches,
                "inline_max_batch": b.inline_max_batch,
            }
            for k, b in self._batchers.items()
        }

    async def infer(self, variant_key: str, images: np.ndarray) -> np.ndarray:
        batcher = self._batchers.get(variant_key)
        if batcher is None:
            health = self._health.get(variant_key)
            raise VariantUnavailable(f"variant {variant_key!r} cannot serve: {health.detail if health else 'unknown'}")
        try:
            return await batcher.submit(np.ascontiguousarray(images, dtype=np.float32))
        except (asyncio.CancelledError, BackendError):
            raise
        except Exception as exc:  # ORT errors at run time
            raise BackendError(f"variant {variant_key!r} failed: {type(exc).__name__}: {exc}") from exc
