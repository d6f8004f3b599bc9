"""Drive a running gateway over HTTP: warm-up, then one recorded phase at a time.

One keep-alive connection pool (wire.py, a minimal HTTP/1.1 client) for the whole run, sized
to the most requests that can be in flight, and request bodies serialised once up front (the
load tester shares the CPU with the gateway it measures; every µs it spends is one the gateway
does not get; wire.py says why not httpx).

Per phase: GET /v1/status → warm-up load (not recorded) → GET /v1/status → recorded load →
wait for what is in flight → GET /v1/status. Memory is compared across the whole phase
(warm-up included); the routing counters across the recorded part only.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaptive_quant.core.stats import percentile
from adaptive_quant.core.v1_wire import CLASSIFY_PATH
from adaptive_quant.tools.loadtest.config import LoadTestConfig
from adaptive_quant.tools.loadtest.loop import closed_loop
from adaptive_quant.tools.loadtest.schedule import CALIBRATION_PHASE, BudgetSpec, BudgetStream, Phase, arrival_times
from adaptive_quant.tools.loadtest.stats import (
    BAD_RESPONSE,
    CLIENT_BUG,
    CONNECTION,
    OVERLOAD,
    TIMEOUT,
    RequestRecord,
    memory_summary,
    routing_delta,
    summarize,
)
from adaptive_quant.tools.loadtest.v2 import INFER_PATH
from adaptive_quant.tools.loadtest.v2 import parse_answer as parse_v2_answer
from adaptive_quant.tools.loadtest.v2 import request_body as v2_request_body
from adaptive_quant.tools.loadtest.wire import WireError, WirePool

log = logging.getLogger(__name__)

# warm-up draws its own schedule, unrelated to the recorded one
WARMUP_SEED_OFFSET = 7919


class GatewayError(RuntimeError):
    """The service could not be used (unreachable, refused the key, not the gateway)."""


class CalibrationError(RuntimeError):
    """The calibration phase gave no figure to derive a budget from."""


@dataclass
class Workload:
    """What the requests carry: pre-serialised bodies and the labels of their images."""

    bodies: list[bytes]  # JSON {"instances": [...]}, one per request group
    labels: np.ndarray  # (n_bodies, batch) int: the known class of each image
    # the same images as v2 infer bodies (binary FP32 tensors) and their JSON header lengths
    tensors: list[tuple[bytes, int]] = field(default_factory=list)

    @classmethod
    def from_images(cls, images: np.ndarray, labels: np.ndarray, groups: np.ndarray, v2: bool = False) -> Workload:
        """images (N, H, W, 3) uint8, labels (N,), groups (n_requests, batch) indices
        → bodies encoded once (PNG + base64, as any caller would send them); with v2, the
        Open Inference Protocol bodies too (normalised with CIFAR-10's mean and std)."""
        from adaptive_quant.core.v1_wire import request_body
        from adaptive_quant.data import CIFAR10_MEAN, CIFAR10_STD

        bodies = [json.dumps(request_body(images[g])).encode() for g in groups]
        tensors = [v2_request_body(images[g], CIFAR10_MEAN, CIFAR10_STD) for g in groups] if v2 else []
        return cls(bodies, np.asarray(labels)[groups], tensors)


@dataclass
class PhaseResult:
    phase: Phase
    budget: BudgetSpec
    records: list[RequestRecord]
    duration_s: float  # s from the first recorded send to the last answer
    status_start: dict[str, Any] | None  # /v1/status before the warm-up
    status_before: dict[str, Any] | None  # ... after the warm-up
    status_after: dict[str, Any] | None  # ... after the recorded load
    client_cpu_s: float | None = None  # this process's CPU time over the recorded load, s

    def summary(self, bin_s: float) -> dict[str, Any]:
        s = summarize(self.records, self.duration_s, bin_s)
        s["cpu_ms_per_request"] = cpu_per_request(
            self.status_before, self.status_after, self.client_cpu_s, s["answered"]
        )
        s["budget_spec"] = str(self.budget)
        s["headers"] = self.phase.headers()
        s["memory"] = memory_summary(_rss(self.status_start), _rss(self.status_after), _rss(self.status_before))
        before, after = _routing(self.status_before), _routing(self.status_after)
        s["server_routing"] = routing_delta(before, after)
        return s


@dataclass
class RunResult:
    phases: dict[str, PhaseResult] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    calibration_result: PhaseResult | None = None
    service: dict[str, Any] = field(default_factory=dict)


def _rss(status: dict[str, Any] | None) -> int | None:
    return _usage(status).get("rss_bytes")


def _usage(status: dict[str, Any] | None) -> dict[str, Any]:
    """The server's memory and CPU: the gateway's processes together where it says (several
    workers), else its one process (the baseline server, older gateways)."""
    status = status or {}
    return status.get("gateway") or status.get("process", {})


def cpu_per_request(
    before: dict[str, Any] | None, after: dict[str, Any] | None, client_cpu_s: float | None, answered: int
) -> dict[str, float | None]:
    """CPU ms spent per answered request over the recorded load, by the server (its /v1/status
    process.cpu_s, every thread) and by this client: on a shared machine, what a request costs."""
    if not answered:
        return {"server": None, "client": None}
    a, b = (_usage(x).get("cpu_s") for x in (before, after))
    server = None if a is None or b is None else round((b - a) * 1e3 / answered, 4)
    client = None if client_cpu_s is None else round(client_cpu_s * 1e3 / answered, 4)
    return {"server": server, "client": client}


def _routing(status: dict[str, Any] | None) -> dict[str, Any] | None:
    return (status or {}).get("routing")


def calibrated_p95(records: Sequence[RequestRecord], precision: str = "int8") -> tuple[float, int]:
    """p95 latency, ms, over answered requests served entirely by `precision` (X-Precision);
    and how many there were."""
    lat = [r.latency_ms for r in records if r.answered and r.precision == precision]
    if not lat:
        raise CalibrationError(
            f"calibration: no request was answered by {precision} alone, so there is no "
            f"{precision} latency to derive a budget from "
            f"(is a {precision} variant served and healthy?)"
        )
    return percentile(lat, 95), len(lat)


class Runner:
    """Runs a LoadTestConfig's phases against the service; `await run()` → RunResult."""

    def __init__(self, cfg: LoadTestConfig, workload: Workload) -> None:
        self.cfg = cfg
        self.work = workload
        self.base_headers = {"Content-Type": "application/json"}
        self.auth = {"X-API-Key": cfg.api_key} if cfg.api_key else {}
        self._live: dict[str, int] = {}  # progress counters of the running phase
        self.v2_path = ""  # POST path of v2 infer, once the model's name is known (run())
        if cfg.protocol == "v2" and len(workload.tensors) != len(workload.bodies):
            raise ValueError("a v2 target needs a Workload built with v2=True")

    # ------------------------------------------------------------------ plumbing

    def _client(self) -> WirePool:
        # no proxy and no redirects by construction: loopback traffic stays on loopback
        return WirePool(self.cfg.http_url, self.cfg.pool_size, self.cfg.timeout_s, headers=self.auth)

    async def get_json(self, client: WirePool, path: str) -> dict[str, Any]:
        where = f"{self.cfg.http_url}{path}"
        try:
            r = await client.request("GET", path)
        except (WireError, TimeoutError) as exc:
            raise GatewayError(
                f"could not reach {where}: {exc!r}; is the gateway running (scripts/serve.py)?"
            ) from None
        if r.status == 401:
            hint = "pass --api-key or set AQ_API_KEY"
            if self.cfg.api_key:
                hint = "it refused the key given"
            msg = f"{where} answered 401: the service needs an API key ({hint})"
            raise GatewayError(msg)
        if r.status != 200:
            raise GatewayError(f"{where} answered {r.status}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            msg = f"{where} did not answer JSON; is this the gateway?"
            raise GatewayError(msg) from None

    async def _status(self, client: WirePool) -> dict[str, Any] | None:
        """/v1/status, or None: a missing figure in the report, not a failed run."""
        try:
            return await self.get_json(client, "/v1/status")
        except GatewayError as exc:
            log.warning("%s", exc)
            return None

    async def _send(
        self, client: WirePool, headers: dict[str, str], i: int, budget: float | None, scheduled: float, t0: float
    ) -> RequestRecord:
        """Request i of the phase; latency counts from `scheduled` (perf_counter s). Never raises."""
        k = i % len(self.work.bodies)
        labels = self.work.labels[k]
        rec = RequestRecord(t_s=scheduled - t0, n_samples=len(labels), budget_ms=budget)
        try:
            await self._exchange(client, headers, rec, k, labels, scheduled)
        except Exception:  # a bug of ours: counted and logged, the run goes on
            log.exception("request %d failed inside the load tester", i)
            rec.error_kind = CLIENT_BUG
        return rec

    async def _exchange(
        self,
        client: WirePool,
        headers: dict[str, str],
        rec: RequestRecord,
        k: int,
        labels: np.ndarray,
        scheduled: float,
    ) -> None:
        """Body k, sent and its answer checked, into `rec`."""
        if rec.budget_ms is not None:
            headers = {**headers, "X-Latency-Budget-Ms": f"{rec.budget_ms:.3f}"}
        v2 = self.cfg.protocol == "v2"
        if v2:  # the budget travels as the header, which the v2 front reads too: one body per image group
            body, header_length = self.work.tensors[k]
            path = self.v2_path
            headers = {
                **headers,
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            }
        else:
            body, path = self.work.bodies[k], CLASSIFY_PATH
        rec.send_lag_ms = max(0.0, (time.perf_counter() - scheduled) * 1e3)
        try:
            r = await client.request("POST", path, body, headers)
        except TimeoutError:
            rec.error_kind = TIMEOUT
            return
        except WireError as exc:
            rec.error_kind = CONNECTION
            log.debug("%r", exc)
            return
        rec.latency_ms = (time.perf_counter() - scheduled) * 1e3
        if r.status != 200:
            rec.error_kind = str(r.status)
            return
        try:
            if v2:
                class_ids, variant_list, budget_met = parse_v2_answer(r.headers, r.body)
            else:
                answer = r.json()
                preds = answer["predictions"]
                class_ids = [p["class_id"] for p in preds]
                variant_list = [str(p["variant"]) for p in preds]
                budget_met = bool(answer["budget_met"])
            if len(class_ids) != len(labels):
                raise ValueError(f"{len(class_ids)} predictions for {len(labels)} images")
            correct = sum(int(c == int(y)) for c, y in zip(class_ids, labels))
            server_ms = float(r.headers["x-server-time-ms"])
        except (ValueError, KeyError, TypeError) as exc:
            rec.error_kind = BAD_RESPONSE
            log.debug("%r", exc)
            return
        rec.correct, rec.variants, rec.server_budget_met = correct, tuple(variant_list), budget_met
        rec.precision = r.headers.get("x-precision")
        rec.server_time_ms = server_ms

    def _count(self, rec: RequestRecord) -> RequestRecord:
        self._live["done"] += 1
        if not rec.answered:
            self._live["errors"] += 1
        return rec

    # ------------------------------------------------------------------ load shapes

    async def _closed(
        self,
        client: WirePool,
        headers: dict[str, str],
        budgets: BudgetStream,
        duration_s: float,
        max_requests: int | None,
        t0: float,
    ) -> list[RequestRecord]:
        async def send(i: int, now: float) -> RequestRecord:
            return self._count(await self._send(client, headers, i, budgets[i], now, t0))

        return await closed_loop(send, self.cfg.concurrency, t0 + duration_s, max_requests)

    async def _open(
        self, client: WirePool, headers: dict[str, str], budgets: BudgetStream, times: np.ndarray, t0: float
    ) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        pending: set[asyncio.Task] = set()
        cap = self.cfg.max_in_flight

        def finished(task: asyncio.Task) -> None:
            pending.discard(task)
            # _send answers every outcome with a record and never raises
            if not task.cancelled():
                records.append(self._count(task.result()))

        for i, t in enumerate(times.tolist()):
            scheduled = t0 + t
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= cap:  # counted, never silently dropped
                n = self.work.labels.shape[1]
                rec = RequestRecord(t, n, budgets[i], error_kind=OVERLOAD)
                records.append(self._count(rec))
                continue
            send = self._send(client, headers, i, budgets[i], scheduled, t0)
            task = asyncio.create_task(send)
            pending.add(task)
            task.add_done_callback(finished)
        while pending:
            await asyncio.gather(*list(pending), return_exceptions=True)
        return records

    async def _load(
        self, client: WirePool, phase: Phase, budget: BudgetSpec, duration_s: float, max_requests: int | None, seed: int
    ) -> tuple[list[RequestRecord], float]:
        """Apply the configured load for one stretch; (records, s from first send to last answer)."""
        cfg = self.cfg
        headers = {**self.base_headers, **phase.headers()}
        budgets = BudgetStream(budget, seed)
        self._live = {"done": 0, "errors": 0}
        # the bodies and earlier phases' records stay alive to the end: out of the cyclic GC's
        # scans, whose full passes over them were client-side pauses counted as server latency
        gc.freeze()
        t0 = time.perf_counter()
        if cfg.mode == "closed":
            records = await self._closed(client, headers, budgets, duration_s, max_requests, t0)
        else:
            times = arrival_times(cfg.arrivals, duration_s, seed, max_requests)
            records = await self._open(client, headers, budgets, times, t0)
        records.sort(key=lambda r: r.t_s)
        return records, time.perf_counter() - t0

    async def _progress(self, name: str, duration_s: float) -> None:
        t0 = time.perf_counter()
        while True:
            await asyncio.sleep(self.cfg.progress_s)
            live = self._live
            log.info(
                "%s: %.0f/%.0f s, %d requests done, %d errors",
                name,
                time.perf_counter() - t0,
                duration_s,
                live.get("done", 0),
                live.get("errors", 0),
            )

    async def run_phase(self, client: WirePool, phase: Phase, budget: BudgetSpec) -> PhaseResult:
        """Warm-up, then the recorded load; the same schedule and budgets for every phase."""
        cfg = self.cfg
        if not phase.send_budget:
            budget = BudgetSpec("none")
        status_start = await self._status(client)
        if cfg.warmup_s > 0:
            log.info("%s: %g s warm-up", phase.name, cfg.warmup_s)
            seed = cfg.seed + WARMUP_SEED_OFFSET
            await self._load(client, phase, budget, cfg.warmup_s, None, seed)
        status_before = await self._status(client)
        log.info(
            "%s: %g s of %s load, budget %s, headers %s",
            phase.name,
            cfg.duration_s,
            cfg.mode,
            budget,
            phase.headers() or "-",
        )
        ticker = None
        if cfg.progress_s > 0:
            ticker = asyncio.create_task(self._progress(phase.name, cfg.duration_s))
        cpu0 = time.process_time()
        try:
            records, elapsed = await self._load(client, phase, budget, cfg.duration_s, cfg.max_requests, cfg.seed)
        finally:
            if ticker is not None:
                ticker.cancel()
        client_cpu = time.process_time() - cpu0
        status_after = await self._status(client)
        return PhaseResult(phase, budget, records, elapsed, status_start, status_before, status_after, client_cpu)

    async def _calibrate(self, client: WirePool) -> PhaseResult:
        """The calibration phase, on the service under test or on --calibrate-url."""
        cfg = self.cfg
        if cfg.calibrate_url is None:
            return await self.run_phase(client, CALIBRATION_PHASE, cfg.budget)
        log.info("calibration against %s", cfg.calibrate_url)
        async with WirePool(cfg.calibrate_url, cfg.pool_size, cfg.timeout_s, headers=self.auth) as other:
            await self.get_json(other, "/v1/models")  # reachable, and the gateway
            return await self.run_phase(other, CALIBRATION_PHASE, cfg.budget)

    async def run(self) -> RunResult:
        cfg = self.cfg
        out = RunResult()
        async with self._client() as client:
            # first: reachable, the key accepted, and it is the gateway
            models = await self.get_json(client, "/v1/models")
            status = await self.get_json(client, "/v1/status")
            self.v2_path = INFER_PATH.format(model=models.get("model"))
            out.service = {
                "protocol": cfg.protocol,
                "model": models.get("model"),
                "classes": models.get("classes"),
                "backend": status.get("backend"),
                "variants": [v.get("key") for v in status.get("variants", [])],
            }
            log.info(
                "target %s: model %s, backend %s, variants %s",
                cfg.url,
                out.service["model"],
                out.service["backend"],
                out.service["variants"],
            )
            budget = cfg.budget
            if cfg.calibrate:
                res = await self._calibrate(client)
                p95, n = calibrated_p95(res.records)
                budget = cfg.budget.resolved(p95)
                out.calibration_result = res
                out.calibration = {
                    "url": cfg.calibrate_url or cfg.url,
                    "int8_p95_ms": p95,
                    "int8_requests": n,
                    "multiplier": cfg.budget.multiplier,
                    "budget_spec": str(cfg.budget),
                    "resolved_budget": str(budget),
                    "budget_ms": budget.params[0] if cfg.budget.needs_calibration else None,
                    "summary": res.summary(cfg.bin_s),
                }
                msg = "calibration: int8 p95 %.2f ms over %d requests → budget %s"
                log.info(msg, p95, n, budget)
            for phase in cfg.phases:
                out.phases[phase.name] = await self.run_phase(client, phase, budget)
        return out


def run_loadtest(cfg: LoadTestConfig, workload: Workload) -> RunResult:
    """Run every phase (in a fresh event loop) and return the raw results."""
    return asyncio.run(Runner(cfg, workload).run())
