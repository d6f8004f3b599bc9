"""Gateway benchmarks (run by scripts/bench_gateway.py; never as timed tests).

1. routing decision per sample: predictor + latency estimate + policy, µs (p50, p99)
2. gateway overhead at concurrency 1: the backend called directly vs the same request through
   the whole gateway in-process (ASGI, no network), ms (p50)
3. throughput over real HTTP (a uvicorn subprocess) at several concurrencies, for the gateway
   pinned to one variant (fixed fp32, fixed int8) and adaptive, samples/s
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np

from adaptive_quant.core.latency import LatencyEstimator
from adaptive_quant.core.manifest import load_manifest
from adaptive_quant.core.precision import Precision
from adaptive_quant.core.routing import Priority, allowed_mask, route_batch
from adaptive_quant.predictor.runtime import PriorPredictor, accuracy_matrix, load_accuracy_predictor
from adaptive_quant.serving.app import create_app
from adaptive_quant.serving.backends.embedded import EmbeddedBackend
from adaptive_quant.serving.decode import to_model_input
from adaptive_quant.serving.settings import ServeSettings
from adaptive_quant.tools.client import request_body


def _pcts(values_s: list[float], scale: float) -> dict[str, float]:
    a = np.asarray(values_s) * scale
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(a)}


def sample_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8 with image-like smoothness (the predictor's features see texture)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


def bench_routing(settings: ServeSettings, iterations: int = 3000) -> dict[str, dict[str, float]]:
    """µs per sample for one routing decision, at request sizes 1 and 32."""
    manifest = load_manifest(settings.repository)
    loaded = load_accuracy_predictor(settings.repository, manifest)
    prior = PriorPredictor.from_manifest(manifest)
    served = manifest.served_variants()
    keys = [v.key for v in served]
    estimator = LatencyEstimator({v.key: v.latency for v in served}, settings.latency)
    allowed = allowed_mask([Precision(v.precision) for v in served], None)
    imgs = sample_images(256)
    out = {}
    for n in (1, 32):
        times = []
        for i in range(iterations if n == 1 else iterations // 8):
            batch = imgs[(i * n) % 224 : (i * n) % 224 + n]
            t = time.perf_counter()
            acc = accuracy_matrix(loaded.predictor, batch, keys, prior)
            est = np.array(estimator.estimates_ms(keys, n))
            route_batch(acc, est, allowed, 10.0, Priority.BALANCED, settings.routing)
            times.append((time.perf_counter() - t) / n)
        out[f"per_sample_us_at_n{n}"] = _pcts(times[len(times) // 10 :], 1e6)  # first 10% = warm-up
    out["predictor"] = {"kind": loaded.kind}  # type: ignore[dict-item]
    return out


async def _direct_backend(settings: ServeSettings, variant: str, x: np.ndarray, iterations: int) -> list[float]:
    manifest = load_manifest(settings.repository)
    backend = EmbeddedBackend(
        settings.repository,
        manifest,
        max_batch_size=settings.batching.max_batch_size,
        max_queue_delay_us=settings.batching.max_queue_delay_us,
        intra_op_threads=settings.backend.intra_op_threads,
    )
    await backend.start()
    try:
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            await backend.infer(variant, x)
            times.append(time.perf_counter() - t)
        return times[iterations // 10 :]
    finally:
        await backend.close()


async def _through_gateway(settings: ServeSettings, body: dict, iterations: int) -> tuple[list[float], list[float]]:
    app = create_app(settings)
    client_s, server_s = [], []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            for _ in range(iterations):
                t = time.perf_counter()
                r = await client.post("/v1/classify", json=body)
                client_s.append(time.perf_counter() - t)
                r.raise_for_status()
                server_s.append(float(r.headers["X-Server-Time-Ms"]) / 1e3)
    k = iterations // 10
    return client_s[k:], server_s[k:]


def bench_overhead(
    settings: ServeSettings, variant: str = "int8", iterations: int = 500
) -> dict[str, dict[str, float]]:
    """ms at concurrency 1, one image: the backend alone vs through the gateway (pinned to `variant`)."""
    manifest = load_manifest(settings.repository)
    img = sample_images(1, seed=7)
    x = to_model_input(img, manifest.mean, manifest.std)
    pinned = replace(settings, variants=[variant])
    direct = asyncio.run(_direct_backend(settings, variant, x, iterations))
    client_s, server_s = asyncio.run(_through_gateway(pinned, request_body(img), iterations))
    d, c, s = _pcts(direct, 1e3), _pcts(client_s, 1e3), _pcts(server_s, 1e3)
    return {
        "backend_direct_ms": d,
        "gateway_server_time_ms": s,
        "gateway_in_process_client_ms": c,
        "overhead_p50_ms": {
            "server_time_minus_direct": s["p50"] - d["p50"],
            "client_minus_direct": c["p50"] - d["p50"],
        },
    }


# ----------------------------------------------------------------------------- throughput over HTTP


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(repository: str, config: str | None, sets: list[str], nice: int = 0) -> ServerProcess:
    """scripts/serve.py in a subprocess on a free loopback port; returns once /readyz answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).resolve().parents[3] / "scripts" / "serve.py"
    cmd = [
        sys.executable,
        str(script),
        "--repository",
        repository,
        "--port",
        str(port),
        "--set",
        "server.log_level=warning",
    ]
    if config:
        cmd += ["--config", config]
    for s in sets:
        cmd += ["--set", s]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return ServerProcess(url, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready within 60 s")


async def _load(url: str, body: dict, headers: dict[str, str], concurrency: int, duration_s: float) -> dict[str, float]:
    done = 0
    errors = 0
    precisions: dict[str, int] = {}
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for _ in range(concurrency):  # warm the connections
            await client.post("/v1/classify", json=body, headers=headers)
        stop = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post("/v1/classify", json=body, headers=headers)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                done += len(body["instances"])
                p = r.headers["X-Precision"]
                precisions[p] = precisions.get(p, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = _pcts(latencies, 1e3) if latencies else {"p50": float("nan"), "p99": float("nan")}
    return {
        "samples_per_s": done / elapsed,
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "errors": errors,
        "precisions": precisions,
    }  # type: ignore[dict-item]


MODES = {
    "fixed_fp32": (["variants=[fp32]"], {}),
    "fixed_int8": (["variants=[int8]"], {}),
    "adaptive": ([], {}),
}


def bench_throughput(
    repository: str,
    config: str | None,
    concurrencies: list[int],
    duration_s: float,
    budget_ms: float | None,
    modes: list[str],
    nice: int = 0,
) -> dict[str, dict[int, dict]]:
    """samples/s per mode and concurrency; one server process per mode, 1 image per request."""
    body = request_body(sample_images(1, seed=11))
    headers = {"X-Latency-Budget-Ms": f"{budget_ms:g}"} if budget_ms else {}
    results: dict[str, dict[int, dict]] = {}
    for mode in modes:
        sets, _ = MODES[mode]
        server = start_server(repository, config, sets, nice)
        try:
            results[mode] = {c: asyncio.run(_load(server.url, body, headers, c, duration_s)) for c in concurrencies}
        finally:
            server.stop()
    return results
