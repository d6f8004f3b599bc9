"""Gateway benchmark helpers (run by `aq-bench`, cli/bench.py; never as timed tests).

What they measure comes in as callables and clients, so this module needs nothing of the
gateway's internals (tools reach the gateway over HTTP only); cli/bench.py builds the
routing function, the backend and the in-process gateway and hands them over.

1. routing decision per sample (`routing_times`): router + planner, or the single-stage policy, µs
2. gateway overhead at concurrency 1 (`backend_times`, `gateway_times`, `overhead`): the
   backend called directly vs the same request through the whole gateway, ms
3. throughput over real HTTP (`bench_throughput`): a gateway subprocess per mode (pinned to
   fp32, pinned to int8, adaptive), closed-loop load from `tools.loadtest` at each concurrency
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from adaptive_quant.core.stats import percentiles, time_calls, time_calls_async
from adaptive_quant.tools.loadtest.config import LoadTestConfig
from adaptive_quant.tools.loadtest.runner import Workload, run_loadtest
from adaptive_quant.tools.loadtest.schedule import BudgetSpec

WARMUP_SHARE = 10  # the first 1/10 of the calls of a timing run are warm-up, not timed


def p50_p99(values: np.ndarray | list[float]) -> dict[str, float]:
    """{"p50", "p99", "n"} of a timing run, in the values' unit."""
    return {**percentiles(values, (50, 99)), "n": len(values)}


def sample_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8 with image-like smoothness (4×4 blocks of one colour), not pixel noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)


# ----------------------------------------------------------------------------- 1. routing


def routing_times(decide: Callable[[np.ndarray], object], iterations: int = 3000) -> dict[str, dict[str, float]]:
    """µs per sample of `decide(images)`, images (n, 32, 32, 3) uint8, at request sizes 1 and 32
    (32: iterations // 8 calls); the first tenth of the calls warm up."""
    imgs = sample_images(256)
    out = {}
    for n in (1, 32):
        calls = iterations if n == 1 else iterations // 8
        batches = [imgs[(i * n) % 224 : (i * n) % 224 + n] for i in range(min(calls, 224))]
        warm = calls // WARMUP_SHARE
        ms = time_calls(lambda i, b=batches: decide(b[i % len(b)]), calls - warm, warmup=warm)
        out[f"per_sample_us_at_n{n}"] = p50_p99(ms * 1e3 / n)
    return out


def host_stalls(seconds: float = 1.0, threshold_us: float = 5.0) -> dict[str, float]:
    """How often this process loses the CPU: a loop that only reads the clock, for `seconds`,
    counting the gaps between two reads longer than `threshold_us` (interrupts, the hypervisor's
    steal, the other vCPU's work). A call of T µs is hit by one in about T × per_s / 1e6 of the
    calls, and pays the gap: on a VM with thousands per second, that, not the code, is a short
    call's p99. Gap figures in µs; 0 when no gap was seen."""
    clock = time.perf_counter_ns
    limit = int(threshold_us * 1e3)
    end = clock() + int(seconds * 1e9)
    gaps: list[int] = []
    last = clock()
    while last < end:
        now = clock()
        if now - last > limit:
            gaps.append(now - last)
        last = now
    g = np.array(gaps, dtype=np.float64) / 1e3
    return {
        "per_s": len(g) / seconds,
        "median_us": float(np.median(g)) if len(g) else 0.0,
        "p90_us": float(np.percentile(g, 90)) if len(g) else 0.0,
        "max_us": float(g.max()) if len(g) else 0.0,
        "lost_share": float(g.sum() / 1e6 / seconds),  # of the window, in gaps
        "threshold_us": threshold_us,
    }


# ----------------------------------------------------------------------------- 2. overhead


async def backend_times(infer: Callable[[], Awaitable[object]], iterations: int) -> np.ndarray:
    """ms per `await infer()` (one request straight to a started backend); the first tenth warm up."""
    warm = iterations // WARMUP_SHARE
    return await time_calls_async(lambda _: infer(), iterations - warm, warmup=warm)


async def gateway_times(
    client: httpx.AsyncClient, body: dict[str, Any], iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """(client ms, X-Server-Time-Ms) per POST /v1/classify of `body` through `client` (a gateway,
    in-process or not, whose lifespan has started); the first tenth warm up."""
    warm = iterations // WARMUP_SHARE
    responses: list[httpx.Response] = []

    async def post(_: int) -> None:
        responses.append(await client.post("/v1/classify", json=body))

    client_ms = await time_calls_async(post, iterations - warm, warmup=warm)
    timed = responses[warm:]
    for r in timed:
        r.raise_for_status()
    return client_ms, np.array([float(r.headers["X-Server-Time-Ms"]) for r in timed])


def overhead(direct_ms: np.ndarray, client_ms: np.ndarray, server_ms: np.ndarray) -> dict[str, dict[str, float]]:
    """The overhead report: each timing's p50/p99 and the gateway's cost over the bare backend."""
    d, c, s = p50_p99(direct_ms), p50_p99(client_ms), p50_p99(server_ms)
    return {
        "backend_direct_ms": d,
        "gateway_server_time_ms": s,
        "gateway_in_process_client_ms": c,
        "overhead_p50_ms": {
            "server_time_minus_direct": s["p50"] - d["p50"],
            "client_minus_direct": c["p50"] - d["p50"],
        },
    }


# ----------------------------------------------------------------------------- 3. throughput over HTTP


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
    """`aq-serve` in a subprocess on a free loopback port; returns once /readyz answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "adaptive_quant.cli.serve",
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


def closed_loop(
    url: str, workload: Workload, budget_ms: float | None, concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """One closed-loop load (`tools.loadtest`, adaptive phase) → samples/s, p50/p99 ms, errors, precisions."""
    budget = BudgetSpec("fixed", (budget_ms,)) if budget_ms else BudgetSpec()
    cfg = LoadTestConfig(
        url=url, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s, budget=budget, progress_s=0
    )
    phase = run_loadtest(cfg, workload).phases["adaptive"]
    s = phase.summary(cfg.bin_s)
    nan = float("nan")
    return {
        "samples_per_s": s["samples_per_s"] or 0.0,
        "p50_ms": nan if s["latency_ms"]["p50"] is None else s["latency_ms"]["p50"],
        "p99_ms": nan if s["latency_ms"]["p99"] is None else s["latency_ms"]["p99"],
        "errors": s["requests"] - s["answered"],
        "precisions": dict(Counter(r.precision for r in phase.records if r.answered)),
    }


MODES = {  # mode → the --set overrides of its server
    "fixed_fp32": ["variants=[fp32]"],
    "fixed_int8": ["variants=[int8]"],
    "adaptive": [],
}


def bench_throughput(
    repository: str,
    config: str | None,
    concurrencies: list[int],
    duration_s: float,
    budget_ms: float | None,
    modes: list[str],
    nice: int = 0,
    warmup_s: float = 1.0,
) -> dict[str, dict[int, dict]]:
    """samples/s per mode and concurrency; one server process per mode, 1 image per request."""
    workload = Workload.from_images(sample_images(1, seed=11), np.zeros(1, np.int64), np.zeros((1, 1), np.int64))
    results: dict[str, dict[int, dict]] = {}
    for mode in modes:
        server = start_server(repository, config, MODES[mode], nice)
        try:
            results[mode] = {
                c: closed_loop(server.url, workload, budget_ms, c, duration_s, warmup_s) for c in concurrencies
            }
        finally:
            server.stop()
    return results
