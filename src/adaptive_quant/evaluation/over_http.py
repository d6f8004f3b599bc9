"""`--url` mode: measure a running gateway over HTTP, as a caller sees it.

Every test sample goes in its own request (concurrency 1, one after the other), once per
(budget, priority) point and once with `X-Min-Precision: fp32` (the service pinned to FP32).
Latency is the client's round trip in ms (request sent → response read), so it includes
PNG decoding, routing, queueing and the network; "within budget" compares the server's own
`X-Server-Time-Ms` with the budget, as the gateway's `X-Budget-Met` does. Accuracy comes from
the labels. Throughput is the sequential request rate (samples/s at concurrency 1); for
throughput under load use scripts/loadtest.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from adaptive_quant.core.stats import percentile
from adaptive_quant.core.v1_wire import CLASSIFY_PATH, headers_for, request_body
from adaptive_quant.data import Split
from adaptive_quant.evaluation.offline import (
    EvalOptions,
    EvaluationError,
    EvaluationReport,
    default_budgets,
    pick_samples,
)
from adaptive_quant.evaluation.report import classification_metrics, mark_frontiers, verdict
from adaptive_quant.evaluation.strategies import FIXED, HTTP, StrategyPoint

log = logging.getLogger(__name__)

HTTP_LATENCY_MODEL = (
    "Latency per sample = the client's round trip for a one-image request (PNG, base64) to the running "
    "gateway, requests sent one after the other; within budget = the server's X-Server-Time-Ms at most the "
    "budget. Throughput = 1000 / mean round trip (samples/s at concurrency 1), not a load test."
)


def _get(client: httpx.Client, path: str) -> dict[str, Any]:
    try:
        r = client.get(path)
    except httpx.HTTPError as exc:
        raise EvaluationError(f"cannot reach the gateway at {client.base_url}{path}: {exc}") from exc
    if r.status_code != 200:
        raise EvaluationError(f"{client.base_url}{path} answered {r.status_code}: {r.text[:200]}")
    return r.json()


def _run_point(
    client: httpx.Client,
    bodies: list[dict[str, Any]],
    labels: np.ndarray,
    keys: list[str],
    headers: dict[str, str],
    desc: str,
    progress: bool,
) -> dict[str, np.ndarray]:
    """One request per sample; returns per-sample arrays: predicted class (−1 = error), variant column, ms."""
    n = len(bodies)
    pred = np.full(n, -1)
    variant = np.full(n, -1)
    client_ms = np.zeros(n)
    server_ms = np.full(n, np.nan)
    for i in tqdm(range(n), desc=desc, unit="req", leave=False, disable=not progress, dynamic_ncols=True):
        t = time.perf_counter()
        r = client.post(CLASSIFY_PATH, json=bodies[i], headers=headers)
        client_ms[i] = (time.perf_counter() - t) * 1e3
        if r.status_code != 200:
            log.warning("sample %d: HTTP %d %s", i, r.status_code, r.text[:200])
            continue
        p = r.json()["predictions"][0]
        pred[i] = p["class_id"]
        variant[i] = keys.index(p["variant"]) if p["variant"] in keys else -1
        server_ms[i] = float(r.headers["X-Server-Time-Ms"])
    return {"pred": pred, "variant": variant, "client_ms": client_ms, "server_ms": server_ms}


def _point(
    run: dict[str, np.ndarray],
    labels: np.ndarray,
    keys: list[str],
    budget: float | None,
    priority: str | None,
    strategy: str,
    label: str,
) -> StrategyPoint:
    ms = run["client_ms"]
    served = run["variant"] >= 0
    mix = np.bincount(run["variant"][served], minlength=len(keys)) / max(1, len(ms))
    within = None
    if budget is not None:  # an error is not an answer within budget
        within = float(np.where(np.isnan(run["server_ms"]), False, run["server_ms"] <= budget).mean())
    return StrategyPoint(
        strategy=strategy,
        label=label,
        accuracy=float((run["pred"] == labels).mean()),
        mean_ms=float(ms.mean()),
        p99_ms=percentile(ms, 99),
        within_budget=within,
        throughput=float(1e3 / ms.mean()),
        mix={k: float(s) for k, s in zip(keys, mix)},
        budget_ms=budget,
        priority=priority,
        extra={
            "server_mean_ms": float(np.nanmean(run["server_ms"])) if served.any() else float("nan"),
            "errors": float((run["pred"] < 0).sum()),
        },
    )


def evaluate_url(url: str, test: Split, opts: EvalOptions, timeout_s: float = 30.0) -> EvaluationReport:
    """Sweep budgets × priorities against a running gateway; nothing is written."""
    test = pick_samples(test, opts.limit, opts.seed)
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        models = _get(client, "/v1/models")
        status = _get(client, "/v1/status")
        if not status.get("ready", False):
            raise EvaluationError(f"the gateway at {url} is not ready (GET /v1/status says ready=false)")
        keys = [v["key"] for v in status["variants"]]
        classes = list(models["classes"])
        estimates = [float(v["latency"]["estimate_ms_batch1"]) for v in status["variants"]]
        budgets: list[float | None] = [*(opts.budgets or default_budgets(estimates)), None]
        bodies = [request_body(im[None]) for im in test.images]
        points: list[StrategyPoint] = []
        default_run = None
        if any(v.get("precision") == "fp32" for v in status["variants"]):
            run = _run_point(
                client, bodies, test.labels, keys, headers_for(None, None, "fp32"), "fp32 floor", opts.progress
            )
            points.append(_point(run, test.labels, keys, None, None, FIXED, "service with X-Min-Precision fp32"))
        grid = [(b, p) for b in budgets for p in opts.priorities]
        for budget, prio in tqdm(grid, desc="http sweep", unit="point", disable=not opts.progress, dynamic_ncols=True):
            run = _run_point(
                client,
                bodies,
                test.labels,
                keys,
                headers_for(budget, prio.value, None),
                f"{prio.value} @ {budget}",
                opts.progress,
            )
            where = "no budget" if budget is None else f"{budget:.3g} ms"
            points.append(_point(run, test.labels, keys, budget, prio.value, HTTP, f"service {prio.value} @ {where}"))
            if budget is None and prio.value == "balanced":
                default_run = run
    mark_frontiers(points)
    service = None
    if default_run is not None:
        ok = default_run["pred"] >= 0
        service = classification_metrics(test.labels[ok], default_run["pred"][ok], classes)
    text = verdict(points, budgets)
    meta = {
        "url": url,
        "model": models.get("model"),
        "classes": classes,
        "samples": len(test),
        "limit": opts.limit,
        "split": "test",
        "single_stage": status.get("single_stage"),
        "routing": status.get("routing"),
        "router_estimates_ms": dict(zip(keys, estimates)),
        "budgets_ms": [b for b in budgets if b is not None],
        "latency_model": HTTP_LATENCY_MODEL,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return EvaluationReport("http", meta, [], points, text, service_metrics=service)
