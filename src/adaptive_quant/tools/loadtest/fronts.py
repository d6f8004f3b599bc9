"""The gateway's three fronts side by side, each through the client its callers use: /v1/classify
(httpx), the Open Inference Protocol over HTTP (tritonclient.http.aio) and over gRPC
(tritonclient.grpc.aio), on the same images, from one client process (scripts/bench_oip.py).

The load tester's parts throughout: its closed loop (loop.py), its phase summary (stats.py: req/s
and latency percentiles), its CPU accounting per answered request (the server's from /v1/status,
this client's from its own process time) and its machine record (report.machine_info, the CPU's
name included). Only the clients differ: aq-loadtest's own HTTP/1.1 client costs less CPU, these
are what a user of each front runs. The fronts take turns for `rounds` rounds, so background load
on a shared machine falls on all of them alike; the median round is reported.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from adaptive_quant.core.images import encode_png, to_model_input
from adaptive_quant.core.net import is_loopback
from adaptive_quant.core.v1_wire import CLASSIFY_PATH, PRIORITY_HEADER
from adaptive_quant.tools.loadtest.config import LoadTestConfigError, check_loopback
from adaptive_quant.tools.loadtest.loop import closed_loop
from adaptive_quant.tools.loadtest.report import machine_info
from adaptive_quant.tools.loadtest.runner import cpu_per_request
from adaptive_quant.tools.loadtest.stats import RequestRecord, summarize

log = logging.getLogger(__name__)

FRONTS = ("v1", "http", "grpc")
Answer = Callable[[int], Awaitable[list[int]]]  # request index → the class ids it got


@dataclass(frozen=True)
class FrontsConfig:
    url: str = "http://127.0.0.1:8000"  # the gateway's HTTP base URL, on loopback
    grpc: str = "127.0.0.1:8081"  # host:port of its gRPC front (server.grpc_port), on loopback
    model: str = "cifar_resnet"  # the v2 model name (the manifest's model_name)
    fronts: tuple[str, ...] = FRONTS
    batch: int = 1  # images per request
    distinct: int = 64  # distinct requests cycled through
    concurrency: int = 8  # requests in flight
    seconds: float = 8.0  # s per front per round
    warmup: float = 2.0  # s per front before measuring
    rounds: int = 3
    priority: str = "balanced"  # X-Priority on /v1, the routing_priority parameter on v2
    v1_encoding: str = "b64"  # b64 (PNG) | pixels
    v2_input: str = "images"  # images (normalised FP32) | pixels (UINT8)
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", check_loopback(self.url))
        host = urlsplit(f"//{self.grpc}").hostname
        if not host or not is_loopback(host):
            raise LoadTestConfigError(f"--grpc {self.grpc!r} must be host:port on this machine (loopback)")
        unknown = [f for f in self.fronts if f not in FRONTS]
        if unknown or not self.fronts:
            raise LoadTestConfigError(f"--fronts {','.join(self.fronts)!r}: choose from {', '.join(FRONTS)}")
        for name, v in (("--batch", self.batch), ("--distinct", self.distinct), ("--concurrency", self.concurrency)):
            if v < 1:
                raise LoadTestConfigError(f"{name} must be >= 1, got {v}")
        if self.rounds < 1 or self.seconds <= 0 or self.warmup < 0:
            raise LoadTestConfigError("--rounds must be >= 1, --seconds > 0 and --warmup >= 0")

    def key_headers(self) -> dict[str, str]:
        return {"x-api-key": self.api_key} if self.api_key else {}


def load_images(n: int, pattern: str) -> np.ndarray:
    """(n, 32, 32, 3) uint8: the first n images of the decoded test-split cache, or random pixels."""
    found = sorted(glob.glob(pattern))
    if found:
        return np.load(found[0])["images"][:n]
    log.warning("no %s: random pixels", pattern)
    return np.random.default_rng(0).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


async def make_fronts(cfg: FrontsConfig, batches: list[np.ndarray]) -> dict[str, tuple[Answer, Callable]]:
    """front name → (answer, close). Bodies and tensors are built once: the client's own cost per
    request is what the libraries add, not encoding."""
    import tritonclient.grpc.aio as triton_grpc
    import tritonclient.http.aio as triton_http

    keys = cfg.key_headers()
    # the normalisation the FP32 input needs, as the model configuration states it
    config = httpx.get(f"{cfg.url}/v2/models/{cfg.model}/config", headers=keys, timeout=10).json()
    mean, std = ([float(v) for v in config["parameters"][k]["string_value"].split(",")] for k in ("mean", "std"))
    fronts: dict[str, tuple[Answer, Callable]] = {}
    if "v1" in cfg.fronts:
        http = httpx.AsyncClient(base_url=cfg.url, timeout=60, limits=httpx.Limits(max_connections=cfg.concurrency))
        headers = {PRIORITY_HEADER: cfg.priority, **keys}
        if cfg.v1_encoding == "b64":
            instances = [[{"b64": base64.b64encode(encode_png(im)).decode()} for im in b] for b in batches]
        else:
            instances = [[{"pixels": im.tolist()} for im in b] for b in batches]
        bodies = [json.dumps({"instances": i}).encode() for i in instances]

        async def v1(i: int) -> list[int]:
            r = await http.post(CLASSIFY_PATH, content=bodies[i % len(bodies)], headers=headers)
            r.raise_for_status()
            return [p["class_id"] for p in r.json()["predictions"]]

        fronts["v1"] = (v1, http.aclose)

    def tensors(module: Any) -> list:
        out = []
        for b in batches:
            x = to_model_input(b, mean, std) if cfg.v2_input == "images" else b
            t = module.InferInput(cfg.v2_input, list(x.shape), "FP32" if cfg.v2_input == "images" else "UINT8")
            t.set_data_from_numpy(x)
            out.append([t])
        return out

    params = {"routing_priority": cfg.priority}
    if "http" in cfg.fronts:
        hc = triton_http.InferenceServerClient(cfg.url.removeprefix("http://"), conn_limit=cfg.concurrency)
        hin = tensors(triton_http)

        async def v2_http(i: int) -> list[int]:
            r = await hc.infer(cfg.model, hin[i % len(hin)], parameters=params, headers=keys or None)
            return r.as_numpy("logits").argmax(1).tolist()

        fronts["http"] = (v2_http, hc.close)
    if "grpc" in cfg.fronts:
        gc = triton_grpc.InferenceServerClient(cfg.grpc)
        gin = tensors(triton_grpc)

        async def v2_grpc(i: int) -> list[int]:
            r = await gc.infer(cfg.model, gin[i % len(gin)], parameters=params, headers=keys or None)
            return r.as_numpy("logits").argmax(1).tolist()

        fronts["grpc"] = (v2_grpc, gc.close)
    return fronts


def as_send(answer: Answer, batch: int, t0: float) -> Callable[[int, float], Awaitable[RequestRecord]]:
    """`answer` as the closed loop's send: one RequestRecord per request, an exception counted as an
    error of its type (a benchmark reports what it saw, it does not stop)."""

    async def send(i: int, now: float) -> RequestRecord:
        rec = RequestRecord(t_s=now - t0, n_samples=batch, budget_ms=None)
        try:
            await answer(i)
            rec.latency_ms = (time.perf_counter() - now) * 1e3
        except Exception as exc:  # counted by kind, as the load tester counts its errors
            rec.error_kind = type(exc).__name__
        return rec

    return send


async def _status(client: httpx.AsyncClient) -> dict[str, Any] | None:
    """/v1/status (the gateway's CPU seconds), or None: a missing figure, not a failed run."""
    try:
        r = await client.get("/v1/status")
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def measure(answer: Answer, cfg: FrontsConfig, status: httpx.AsyncClient, seconds: float) -> dict[str, Any]:
    """One closed-loop stretch of one front: req/s, latency p50/p99 ms, errors, and CPU ms per
    answered request of the server and of this client (on a small shared machine the client's
    cost takes cores from the server, so both are worth seeing)."""
    before = await _status(status)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    records = await closed_loop(as_send(answer, cfg.batch, t0), cfg.concurrency, t0 + seconds)
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    after = await _status(status)
    s = summarize(records, wall)
    cpu = cpu_per_request(before, after, client_cpu, s["answered"])
    nan = float("nan")
    return {
        "rps": s["throughput_rps"] or 0.0,
        "p50_ms": nan if s["latency_ms"]["p50"] is None else s["latency_ms"]["p50"],
        "p99_ms": nan if s["latency_ms"]["p99"] is None else s["latency_ms"]["p99"],
        "errors": s["requests"] - s["answered"],
        "errors_by_kind": s["errors_by_kind"],
        "server_cpu_ms": nan if cpu["server"] is None else cpu["server"],
        "client_cpu_ms": nan if cpu["client"] is None else cpu["client"],
    }


async def bench_fronts(cfg: FrontsConfig, images: np.ndarray) -> dict[str, Any]:
    """Every front in turn, `cfg.rounds` times (who goes first rotates), after a warm-up each; the
    median round per front, the rounds' req/s and the machine."""
    batches = [images[i : i + cfg.batch] for i in range(0, len(images), cfg.batch)]
    fronts = await make_fronts(cfg, batches)
    status = httpx.AsyncClient(base_url=cfg.url, timeout=10, headers=cfg.key_headers())
    try:
        # the same images get the same answer on every front (routing aside, which the priority fixes)
        answers = {name: await answer(0) for name, (answer, _) in fronts.items()}
        for answer, _ in fronts.values():  # warm-up: connections, the server's caches
            await measure(answer, cfg, status, cfg.warmup)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in fronts}
        load_before = os.getloadavg()
        for r in range(cfg.rounds):
            order = list(fronts)[r % len(fronts) :] + list(fronts)[: r % len(fronts)]
            for name in order:
                rounds[name].append(await measure(fronts[name][0], cfg, status, cfg.seconds))
        load_after = os.getloadavg()
    finally:
        await status.aclose()
        for _, close in fronts.values():
            await close()
    summary = {}
    for name, runs in rounds.items():
        rps = [x["rps"] for x in runs]
        mid = sorted(runs, key=lambda x: x["rps"])[len(runs) // 2]
        summary[name] = {**mid, "rps_median": statistics.median(rps), "rps_rounds": [round(v, 1) for v in rps]}
    machine = machine_info()
    return {
        "cpu": machine["cpu"],
        "cores": machine["cores"],
        "machine": machine,
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "batch": cfg.batch,
        "concurrency": cfg.concurrency,
        "seconds": cfg.seconds,
        "rounds": cfg.rounds,
        "v1_encoding": cfg.v1_encoding,
        "v2_input": cfg.v2_input,
        "priority": cfg.priority,
        "answers_agree": len({tuple(a) for a in answers.values()}) == 1,
        "fronts": summary,
    }


def run_fronts(cfg: FrontsConfig, images: np.ndarray) -> dict[str, Any]:
    """`bench_fronts` in a fresh event loop."""
    return asyncio.run(bench_fronts(cfg, images))
