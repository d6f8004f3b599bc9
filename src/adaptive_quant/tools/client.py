"""Calling the gateway over HTTP: request bodies and headers, a client, a readable result table.

Used by `aq-predict`, `aq-make-sample`, `aq-bench` and the load tester; the request format itself
is core/v1_wire.py, which the evaluation's --url mode uses too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from adaptive_quant.core.v1_wire import CLASSIFY_PATH


def load_request(path: str | Path) -> dict[str, Any]:
    """A request body saved as JSON (e.g. data/sample.json)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (scripts/make_sample.py writes one)")
    body = json.loads(p.read_text())
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise ValueError(f'{p} is not a classify request: expected {{"instances": [...]}}')
    return body


def http_client(url: str, timeout_s: float = 30.0, api_key: str | None = None) -> httpx.Client:
    """A client for the gateway at `url`; every request carries `api_key` as X-API-Key when there is one.
    (An in-process gateway, for `aq-predict` without --url, is wired in cli/predict.py: tools reach
    the gateway over HTTP only.)"""
    return httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=auth_headers(api_key))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


@dataclass
class Row:
    sample: int
    status: int
    label: str
    confidence: float | None
    precision: str
    latency_ms: float | None  # server time of the request that carried this sample
    budget_met: str


def classify_rows(client: httpx.Client, body: dict[str, Any], headers: dict[str, str], one_by_one: bool) -> list[Row]:
    """Send the instances (each alone, or all in one request) and return one row per sample."""
    instances = body["instances"]
    groups = [[i] for i in range(len(instances))] if one_by_one else [list(range(len(instances)))]
    rows: list[Row] = []
    for group in groups:
        r = client.post(CLASSIFY_PATH, json={"instances": [instances[i] for i in group]}, headers=headers)
        if r.status_code != 200:
            msg = (
                r.json().get("error", {}).get("message", r.text)
                if r.headers.get("content-type", "").startswith("application/json")
                else r.text
            )
            rows += [Row(i, r.status_code, f"error: {msg}", None, "-", None, "-") for i in group]
            continue
        server_ms = float(r.headers["X-Server-Time-Ms"])
        for i, p in zip(group, r.json()["predictions"]):
            rows.append(Row(i, 200, p["label"], p["confidence"], p["precision"], server_ms, r.headers["X-Budget-Met"]))
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'sample':>6}  {'label':<12} {'confidence':>10}  {'precision':<9} {'latency ms':>10}  {'budget met':<10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        conf = f"{r.confidence:.3f}" if r.confidence is not None else "-"
        lat = f"{r.latency_ms:.2f}" if r.latency_ms is not None else "-"
        lines.append(f"{r.sample:>6}  {r.label:<12} {conf:>10}  {r.precision:<9} {lat:>10}  {r.budget_met:<10}")
    return "\n".join(lines)
